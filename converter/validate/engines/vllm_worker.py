"""One model served by vLLM, in a process of its own, for `validate --engine vllm`: teacher-forced log-probs of
given token sequences, greedy continuations, and what vLLM chose to run the weights with. Run by any Python that
has vLLM (it imports nothing of convert-fp8), from another folder than its own (whose `vllm.py` and
`transformers.py` would shadow the packages):

    python -c "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
        .../vllm_worker.py MODEL_DIR REQUEST.json ANSWER.json

REQUEST holds `sequences` (lists of token ids), `max_new_tokens`, and optionally `dtype` and `memory_fraction`
(vLLM's `gpu_memory_utilization`, which on its CPU backend is the share of the machine's memory it reserves). ANSWER gets, per sequence, the
log-prob vLLM gives each token after the first (`logprobs`), its most likely token there (`top1`) and the greedy
continuation (`greedy`), and the vLLM
version and the quantization method it loaded; or `error`, one line, when vLLM refuses the checkpoint. A process
per model: vLLM keeps its engine to the end of the process, and its teardown may abort after answering.
"""

import json
import math
import os
import sys


def main(model: str, request_path: str, answer_path: str) -> int:
    request = json.loads(open(request_path).read())
    answer = {}
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        answer["vllm"] = vllm.__version__
        longest = max(len(s) for s in request["sequences"]) + request["max_new_tokens"] + 8
        # token ids in, token ids out: no tokenizer needed (a tiny test model has none)
        memory = {"gpu_memory_utilization": request["memory_fraction"]} if request.get("memory_fraction") else {}
        llm = LLM(model=model, dtype=request.get("dtype", "bfloat16"), enforce_eager=True, max_model_len=longest,
                  seed=0, skip_tokenizer_init=True, **memory)
        config = llm.llm_engine.model_config
        answer["quantization"] = getattr(config, "quantization", None)
        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in request["sequences"]]
        scored = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0, detokenize=False),
                              use_tqdm=False)
        answer["logprobs"], answer["top1"] = [], []
        for sequence, out in zip(request["sequences"], scored):
            values, best = [], []
            for position, token in enumerate(sequence[1:], start=1):
                entry = out.prompt_logprobs[position] or {}
                found = entry.get(token)
                values.append(found.logprob if found is not None else math.nan)
                best.append(next((t for t, p in entry.items() if p.rank == 1), None))
            answer["logprobs"].append(values)
            answer["top1"].append(best)
        greedy = llm.generate(prompts, SamplingParams(max_tokens=request["max_new_tokens"], temperature=0.0,
                                                     detokenize=False),
                              use_tqdm=False)
        answer["greedy"] = [list(out.outputs[0].token_ids) for out in greedy]
    except Exception as exc:  # noqa: BLE001 - vLLM's refusal is the answer
        text = str(exc).strip().splitlines()
        answer["error"] = f"{type(exc).__name__}: {text[-1] if text else ''}"
    with open(answer_path, "w") as f:
        json.dump(answer, f, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
