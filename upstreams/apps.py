from django.apps import AppConfig


class UpstreamsConfig(AppConfig):
    name = "upstreams"
    verbose_name = "Upstreams"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from upstreams import signals  # noqa: F401
