"""Multi-tenant serving: many unmerged (non-linear) adapters over one base model.

    from nora.serving import serve
    serve("smollm2-135m", "adapters/", port=8000)      # what `nora serve` runs

or piece by piece:

    multi = MultiAdapterModel(model)                   # one base model, shared
    store = AdapterStore(multi, "adapters/", max_resident=16)
    engine = Engine(multi, tokenizer, store).start()   # continuous batching, streaming
    app = create_app(engine, "smollm2-135m")           # OpenAI-compatible endpoints

Files: plan.py (per-step segment metadata), layers.py (the batched MultiAdapterLinear:
shrink → σ → expand, with σ and stacking taken from each method's class), multi.py (MultiAdapterModel: add,
validate, forward), store.py (adapter directory, LRU), engine.py (generation), server.py (HTTP).
"""

from nora.serving.engine import Delta, Engine, OverloadedError, Request, SamplingParams
from nora.serving.layers import MultiAdapterLinear, UnsupportedAdapterError
from nora.serving.multi import AdapterInfo, MultiAdapterModel, UnknownAdapterError
from nora.serving.plan import BatchPlan
from nora.serving.server import ServerThread, build, create_app, load_server, serve
from nora.serving.store import (
    AdapterBusyError,
    AdapterNameError,
    AdapterStore,
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
    "MultiAdapterLinear",
    "MultiAdapterModel",
    "OverloadedError",
    "Request",
    "SamplingParams",
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
