"""`django.contrib.admin`, installed with the project's site (`llmgateway.admin_site`).

Apart from the site's module because an app config is imported before any model is loaded,
and the site imports the cost console, which reads models.
"""

from django.contrib.admin.apps import AdminConfig


class GatewayAdminConfig(AdminConfig):
    default_site = "llmgateway.admin_site.GatewayAdminSite"
