"""Run a batch of greedy requests through vLLM's offline `LLM` with nora's plugin active.

    python -m nora.vllm.offline spec.json out.json

Used by the tests and benchmarks, which run in nora's own environment and call this in the
vLLM environment (.venv-vllm) as a subprocess. The spec:

    {"model": folder, "adapters": {name: folder}, "max_lora_rank": 16, "max_loras": 8,
     "tp": 1, "dtype": "float32", "max_model_len": 512, "skip_tokenizer_init": false,
     "runs": [[{"prompt": [token ids], "adapter": name or null, "max_tokens": n}, ...], ...]}

Each run is one `LLM.generate` call (all its requests batched together). Its adapters are
loaded first with `llm.llm_engine.add_lora`: a refused adapter is then an exception for this
run (reported, and the next run goes on with the same engine), whereas a LoRA failing to load
inside `generate` stops vLLM's engine (vLLM's behaviour for any adapter).
Output: {"runs": [{"tokens": [[ids] per request], "seconds": s} or {"error": message}]}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        enable_lora=True,
        max_lora_rank=spec.get("max_lora_rank", 16),
        max_loras=spec.get("max_loras", 8),
        max_model_len=spec.get("max_model_len", 512),
        tensor_parallel_size=spec.get("tp", 1),
        seed=0,
        enable_prefix_caching=False,
        skip_tokenizer_init=spec.get("skip_tokenizer_init", False),  # token ids in and out
    )
    ids = {name: i + 1 for i, name in enumerate(spec["adapters"])}
    results = []
    for reqs in spec["runs"]:
        prompts = [{"prompt_token_ids": r["prompt"]} for r in reqs]
        params = [
            SamplingParams(
                temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True, detokenize=False
            )
            for r in reqs
        ]
        loras = [
            LoRARequest(r["adapter"], ids[r["adapter"]], spec["adapters"][r["adapter"]])
            if r.get("adapter")
            else None
            for r in reqs
        ]
        try:  # load first: a refusal here is an error for the caller, not for the engine
            for req in {r.lora_name: r for r in loras if r is not None}.values():
                llm.llm_engine.add_lora(req)
        except Exception as e:
            results.append({"error": f"{type(e).__name__}: {e}"})
            continue
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        results.append(
            {
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "seconds": time.perf_counter() - t0,
            }
        )
    return {"runs": results}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    # a file, not stdout: vLLM's processes write their logs to the same stdout
    Path(sys.argv[2]).write_text(json.dumps(run(spec)))


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main()
