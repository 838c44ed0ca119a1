from django.apps import AppConfig


class LlmgatewayConfig(AppConfig):
    name = "llmgateway"
    verbose_name = "Gateway"

    def ready(self) -> None:
        from django.apps import apps
        from django.contrib.auth import get_user_model
        from django.db.models.signals import post_delete, post_migrate, post_save

        from llmgateway.auth import forget_verified_keys
        from llmgateway.models import ApiKey

        for model in (ApiKey, get_user_model()):
            for signal in (post_save, post_delete):
                signal.connect(forget_verified_keys, sender=model, dispatch_uid=f"llmgateway.auth.{model.__name__}.{signal}")
        from llmgateway.services import stop_calls_of_deactivated_user
        from llmgateway.staff import sync_after_migrate

        post_save.connect(stop_calls_of_deactivated_user, sender=get_user_model(), dispatch_uid="llmgateway.services.deactivated")

        # After billing's migrate: its permissions (created by then) and ours exist.
        post_migrate.connect(sync_after_migrate, sender=apps.get_app_config("billing"), dispatch_uid="llmgateway.staff.cost_viewers")
