"""The GMM-CIL Ray Serve application: an HTTP ingress in front of two independently scaled deployments.

    Ingress (FastAPI)  --caption-->  Captioner  --similarities (the free rule only)-->  Matcher
        |                          encoder + projection + frozen LLM,            text encoder +
        |                          @serve.batch, one served version              label bank
        |                          (projection, classes, rule, statistics)
        +--announce-->  Watcher: polls the projection store, moves the app to a new version; every
                                 Captioner replica reports to it what it serves

One deployment per module (serve/ingress.py, captioner.py, matcher.py, watcher.py); their arguments and
user_configs are in serve/settings.py; deploying and moving versions is serve/deploy.py. This module builds the
application from its typed arguments: `import_path: serve.app:app_builder` in serve/config.yaml.
"""
# no `from __future__ import annotations`: Serve reads app_builder's annotation to validate `args` as AppArgs
from ray import serve

from .captioner import Captioner
from .ingress import Ingress
from .matcher import Matcher
from .settings import AppArgs, CaptionerConfig, MatcherConfig, WatcherConfig
from .watcher import Watcher


def app_builder(args: AppArgs) -> serve.Application:
    """The application from its arguments (`args:` in serve/config.yaml): a typed builder, so Serve validates
    them as `AppArgs` before calling it (a mapping is accepted too, for `serve.run(app_builder({...}))`)."""
    from gmm_model.spec import resolve_stack

    settings = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    stack = resolve_stack(settings.stack)
    matcher = Matcher.options(user_config=MatcherConfig().model_dump()).bind(
        settings.store_url, settings.storage_options, stack.model_dump(), settings.threads)
    watcher = Watcher.options(user_config=WatcherConfig().model_dump()).bind(
        settings.store_url, settings.storage_options, stack.fingerprint)
    captioner = Captioner.options(user_config=CaptionerConfig().model_dump()).bind(
        settings.store_url, settings.storage_options, stack.model_dump(), settings.cache_dir, matcher, watcher,
        settings.threads)
    return Ingress.bind(captioner, watcher, settings.model_dump())
