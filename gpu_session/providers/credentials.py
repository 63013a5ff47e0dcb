"""The clouds' API keys inside a provider process: the stack's secret config (`lambdaApiKey`,
`runpodApiKey`) when configure() got one, else LAMBDA_API_KEY / RUNPOD_API_KEY from the
environment, which the engine passes to its plugins. Read per call, so a rotated key works for
`destroy` without a prior `up`."""

from __future__ import annotations

import os

from gpu_session.clouds import API_KEY_CONFIG, API_KEY_ENV, Cloud, get_cloud

from .lifetime import end_with_engine


class CloudAccess:
    """Mixed into providers: configure() keeps the config's keys (in the provider process only:
    configure runs after unpickling, so nothing it sets is ever pickled)."""

    def configure(self, req) -> None:
        end_with_engine()
        self._config_keys = {cloud: req.config.get(key) for cloud, key in API_KEY_CONFIG.items()}

    def cloud(self, name: str) -> Cloud:
        key = (getattr(self, "_config_keys", None) or {}).get(name) or os.environ.get(API_KEY_ENV.get(name, ""))
        return get_cloud(name, api_key=key)
