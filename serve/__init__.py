"""Online serving of GMM-CIL on Ray Serve (see docs/serving.md). One deployment per module:

serve/app.py        app_builder(args): the application (serve/config.yaml's import_path serve.app:app_builder)
serve/settings.py   AppArgs and each deployment's user_config (CaptionerConfig, MatcherConfig, WatcherConfig)
serve/ingress.py    Ingress: the FastAPI app (routes, tokens, input checks, the playground at /); orders answers
                    across Captioner replicas (never one older than an answer already given)
serve/auth.py       who may call what: the API token, the separate admin token, failing closed (no Ray)
serve/static/       the web playground: index.html, playground.js, playground.css (no CDN)
serve/captioner.py  Captioner: encoder + projection + frozen LLM, batched, one served version (projection, classes,
                    rule, class statistics) at a time; answers with gmm_model.classify.classify
serve/matcher.py    Matcher: text encoder + label bank, for the free rule
serve/watcher.py    Watcher: polls the store, takes announcements, moves the app to a version, settles a move once
                    every Captioner replica reports it serves it
serve/deploy.py     start(store_url, ...), and moving the served version through Serve's user_config (one redeploy path)
serve/inputs.py     request checking (content type, size, multipart, decoding), without Ray
serve/config.yaml   `serve run serve/config.yaml`, `serve deploy serve/config.yaml`
serve/client.py     announce(url, version, token), announcer(url, token) for jobs, classify(...): httpx only
serve/launch.py     `python -m serve.launch --store runs/demo/store`
serve/bench.py      closed-loop load benchmark across a version swap
"""
