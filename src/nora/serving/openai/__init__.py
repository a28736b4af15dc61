"""The OpenAI-compatible HTTP layer: protocol.py (typed request / response bodies),
responses.py (response shapes and the event stream), app.py (routes, keys, errors)."""
