"""Multi-tenant serving: many unmerged (non-linear) adapters over one base model.

    from nora.serving import ServeConfig, serve
    serve(ServeConfig(base="smollm2-135m", adapters_dir="adapters/", port=8000))  # nora serve

or piece by piece:

    multi = MultiAdapterModel(model)                   # one base model, shared
    store = AdapterStore(multi, "adapters/", max_resident=16)
    engine = Engine(multi, tokenizer, store).start()   # continuous batching, streaming
    app = create_app(engine, "smollm2-135m")           # OpenAI-compatible endpoints

Files, one job each (vLLM's and SGLang's layout): plan.py (per-step segment metadata),
backend.py (how a kind's delta is computed), layers.py (the batched MultiAdapterLinear:
shrink → σ → expand, with σ and stacking taken from each method's class), multi.py
(MultiAdapterModel: add, validate, forward), store.py (adapter directory, LRU),
sampling.py (SamplingParams, the draw, logprobs), detokenize.py (incremental text, stop
strings), kv_rows.py (the batch's KV rows), engine.py (queue, admission, step loop, worker),
openai/ (protocol.py: typed bodies; completions.py; responses.py; app.py: routes, keys,
errors), tenants.py (keys), metrics.py (Prometheus), config.py (ServeConfig), launch.py
(build, run, drain).
"""

from nora.serving.config import ServeConfig
from nora.serving.engine import Delta, Engine, EngineStats, OverloadedError, Request
from nora.serving.launch import ServerThread, build, load_server, serve
from nora.serving.layers import MultiAdapterLinear, UnsupportedAdapterError
from nora.serving.multi import AdapterInfo, MultiAdapterModel, UnknownAdapterError
from nora.serving.openai.app import create_app
from nora.serving.plan import BatchPlan
from nora.serving.sampling import ParamError, SamplingParams
from nora.serving.store import (
    AdapterBusyError,
    AdapterNameError,
    AdapterStore,
    FixedStore,
    StoreFullError,
    check_name,
)

__all__ = [
    "AdapterBusyError",
    "AdapterInfo",
    "AdapterNameError",
    "AdapterStore",
    "BatchPlan",
    "Delta",
    "Engine",
    "EngineStats",
    "FixedStore",
    "MultiAdapterLinear",
    "MultiAdapterModel",
    "OverloadedError",
    "ParamError",
    "Request",
    "SamplingParams",
    "ServeConfig",
    "ServerThread",
    "StoreFullError",
    "UnknownAdapterError",
    "UnsupportedAdapterError",
    "build",
    "check_name",
    "create_app",
    "load_server",
    "serve",
]
