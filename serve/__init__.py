"""Online serving of GMM-CIL on Ray Serve (see docs/serving.md).

serve/app.py      the application: Ingress (FastAPI) -> Captioner (batched) / Matcher, plus the Watcher
serve/config.yaml `serve run serve/config.yaml`, `serve deploy serve/config.yaml`
serve/client.py   announce(url, version, token): tell a running app to serve a new store version
serve/launch.py   `python -m serve.launch --store runs/demo/store`
serve/bench.py    closed-loop load benchmark across a version swap
"""
