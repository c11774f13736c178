"""Chapter 9's adapters outside Python: exported to llama.cpp's LoRA GGUF by llama.cpp's own converter,
run by llama.cpp (through llama-cpp-python) on the base model's Q4_1 GGUF, and compared with the
answers labkit's cache holds for the same adapters (fp32 SmolLM2 through peft, scripts/run_adapters.py).

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
      -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
      -DGGML_AMX_BF16=OFF" pip install --no-deps llama-cpp-python==0.3.36 diskcache   # compiles: 4 min on 2 cores
    python scripts/run_llama_cpp.py

Why those flags: llama.cpp's default build (-march=native) compiles its AMX kernels wherever the CPU
reports AMX, and this project's faster machines report AMX_INT8 while their kernel does not let a
process use AMX tiles: the first matrix product then dies (a general protection fault at
ldtilecfg). The flags build llama.cpp for AVX2 and AVX512 without AMX; on a CPU without AVX512
(the other machine kind) leave out the three AVX512 flags.

Writes data/results/llama_cpp.json: for each adapter and task, llama.cpp's 60 greedy answers, their
exact match, and how many agree with labkit's cached answers word for word; decoding speed of
llama.cpp and labkit (base, with an adapter, merged) on the same CPU; file sizes. Chapter 9 reads it.
The same prompt tokens go to both (labkit's tokenizer and chat template), so tokenization cannot
be why two answers differ.
"""
import argparse
import ctypes
import json
import platform
import time
from pathlib import Path

import torch

import labkit as lk
from labkit import export, serving

ROOT = Path(__file__).resolve().parent.parent
SPEED_TOKENS, SPEED_REPEATS = 32, 3


def llama(model_path, lora_path=None):
    from llama_cpp import Llama
    return Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=1024,
                 n_threads=torch.get_num_threads(), n_batch=512, seed=0, verbose=False)


def answer(llm, tok, prompt, max_new_tokens, stop_at_eos=True):
    """Greedy tokens from llama.cpp for labkit's exact prompt tokens; (text, n_generated)."""
    ids = tok(lk.text.chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if stop_at_eos and t == tok.eos_token_id:
            break
        out.append(t)
        if len(out) == max_new_tokens:
            break
    return tok.decode(out, skip_special_tokens=True).strip(), len(out)


def same_share(answers, others):
    """The share of answers word for word equal to the other list's."""
    return sum(a == b for a, b in zip(answers, others, strict=True)) / len(answers)


def seconds_per_token_llama(llm, tok, prompt):
    best = float("inf")
    for _ in range(SPEED_REPEATS):
        t0 = time.perf_counter()
        _, n = answer(llm, tok, prompt, SPEED_TOKENS, stop_at_eos=False)
        best = min(best, time.perf_counter() - t0)
    assert n == SPEED_TOKENS
    return best / SPEED_TOKENS


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "results" / "llama_cpp.json")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "llama_cpp")
    args = ap.parse_args()
    import llama_cpp
    lk.setup(seed=0)
    tok = lk.load_tokenizer()
    cache = serving.load_results()
    tasks = {t: lk.data.load_task(t)["test"] for t in serving.TASKS}
    args.work.mkdir(parents=True, exist_ok=True)
    base = export.base_gguf()
    result = {"settings": {"llama_cpp_python": llama_cpp.__version__, "base_gguf": base.name,
                           "max_new_tokens": serving.MAX_NEW_TOKENS, "threads": torch.get_num_threads(),
                           "machine": platform.processor() or platform.machine(),
                           "avx512_bf16": lk.session.cpu_has_avx512_bf16(), "torch": torch.__version__,
                           "speed_tokens": SPEED_TOKENS, "speed_repeats": SPEED_REPEATS},
              "sizes": {"base_gguf": base.stat().st_size}, "exports": {}, "answers": {}, "exact_match": {},
              "agree_with_labkit": {}, "labkit_exact_match": {}, "speed": {}}

    # 1. export: each adapter through llama.cpp's converter
    ggufs = {}
    for name in serving.TASKS:
        out = export.adapter_to_gguf(serving.adapter_dir(name), args.work / f"{name}.gguf", base=lk.smollm2_path())
        ggufs[name] = out["path"]
        result["exports"][name] = {"alpha": out["alpha"], "r": out["r"], "gguf_bytes": out["bytes"],
                                   "peft_bytes": serving.folder_bytes(serving.adapter_dir(name))}
        print(f"exported {name}: {out['bytes'] / 2**20:.2f} MiB", flush=True)

    # 2. answers: llama.cpp, base + each adapter, on every task's test set; against labkit's cache
    for name in ["base", *serving.TASKS]:
        llm = llama(base, None if name == "base" else ggufs[name])
        for t, rows in tasks.items():
            got = [answer(llm, tok, r["prompt"], serving.MAX_NEW_TOKENS)[0] for r in rows]
            ref = cache["answers"][name][t]
            result["answers"].setdefault(name, {})[t] = got
            result["exact_match"].setdefault(name, {})[t] = lk.data.exact_match(got, [r["response"] for r in rows])
            result["agree_with_labkit"].setdefault(name, {})[t] = same_share(got, ref)
            result["labkit_exact_match"].setdefault(name, {})[t] = cache["scores"][name][t]
            print(f"{name:>7} on {t:<7} llama.cpp {result['exact_match'][name][t]:.0%}, labkit "
                  f"{cache['scores'][name][t]:.0%}, same answer {result['agree_with_labkit'][name][t]:.0%}", flush=True)
        del llm

    # 3. a merged model: the people adapter in the weights, written as safetensors and as GGUF
    model, _ = lk.load_model("smollm2")
    lk.load_adapter(model, serving.adapter_dir("people"))
    merged = export.merged_to_gguf(model, tok, args.work, outtype="f16")
    params = llama_cpp.llama_model_quantize_default_params()          # as llama-quantize does: f16 -> Q4_1
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1
    merged_q4 = args.work / "merged-q4_1.gguf"
    rc = llama_cpp.llama_model_quantize(str(merged["gguf"]).encode(), str(merged_q4).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize returned {rc}"
    result["sizes"].update({"merged_safetensors": merged["safetensors"], "merged_f16_gguf": merged["gguf_bytes"],
                            "merged_q4_1_gguf": merged_q4.stat().st_size, "adapter_gguf": result["exports"]["people"]["gguf_bytes"]})
    people_refs = [r["response"] for r in tasks["people"]]
    for label, path in (("merged_f16", merged["gguf"]), ("merged_q4_1", merged_q4)):
        llm = llama(path)
        got = [answer(llm, tok, r["prompt"], serving.MAX_NEW_TOKENS)[0] for r in tasks["people"]]
        del llm
        result[label] = {"answers": got, "exact_match": lk.data.exact_match(got, people_refs),
                         "agree_with_llama_cpp_adapter": same_share(got, result["answers"]["people"]["people"]),
                         "agree_with_labkit": same_share(got, cache["answers"]["people"]["people"]),
                         "agree_with_llama_cpp_base": same_share(got, result["answers"]["base"]["people"])}
        print(label, "on people:", {k: v for k, v in result[label].items() if k != "answers"}, flush=True)
    result["requantized"] = snapped_back(base, merged_q4, model)

    # 4. speed: seconds per token at batch 1, prompt included, the same prompt and token count
    prompt = tasks["people"][0]["prompt"]
    speed = {}
    for label, path, lora in [("base", base, None), ("adapter", base, ggufs["people"]), ("merged f16", merged["gguf"], None),
                              ("merged Q4_1", merged_q4, None)]:
        speed[f"llama.cpp {label}"] = seconds_per_token_llama(llama(path, lora), tok, prompt)
    labkit_model, _ = lk.load_model("smollm2")
    speed["labkit base"] = lk.finetune.latency_per_token(labkit_model, tok, prompt, SPEED_TOKENS, SPEED_REPEATS)
    lk.load_adapter(labkit_model, serving.adapter_dir("people"))
    speed["labkit adapter"] = lk.finetune.latency_per_token(labkit_model, tok, prompt, SPEED_TOKENS, SPEED_REPEATS)
    lk.merge_lora(labkit_model)
    speed["labkit merged"] = lk.finetune.latency_per_token(labkit_model, tok, prompt, SPEED_TOKENS, SPEED_REPEATS)
    result["speed"] = speed
    for k, v in speed.items():
        print(f"{k:<22} {1 / v:6.1f} tokens/s", flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)


def snapped_back(base_path, merged_path, model):
    """What Q4_1 leaves of the merged update dW, over every adapted weight (dW in llama.cpp's row
    order for q and k): |Q4_1(W0 + dW) - (W0 + dW)| / |dW| (the rounding error against the update),
    the cosine between the change Q4_1(W0 + dW) - W0 and dW, the share of entries left at the base
    file's value, and the median Q4_1 grid step (block of 32: (max - min) / 15) against the median |dW|."""
    import gguf
    import numpy as np
    config = json.loads((lk.smollm2_path() / "config.json").read_text())
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}

    def tensors(path):
        return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    def read(t, shape):
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape))

    base_t, merged_t = tensors(base_path), tensors(merged_path)
    err, cos, same, steps, sizes = [], [], [], [], []
    for name, layer in lk.lora_layers(model):                   # the unmerged model: merged_to_gguf merged a copy
        i, kind = int(name.split(".layers.")[1].split(".")[0]), name.rsplit(".", 1)[1]
        delta = (layer.scaling * layer.lora_B @ layer.lora_A).detach()
        if kind in heads:                                       # llama.cpp's row order (see lk.export)
            n = heads[kind]
            delta = delta.reshape(n, 2, delta.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(delta.shape)
        g = f"blk.{i}.{GGUF_NAME[kind]}.weight"
        w0, w1 = read(base_t[g], delta.shape), read(merged_t[g], delta.shape)
        err.append(((w1 - (w0 + delta)).norm() / delta.norm()).item())
        cos.append(torch.nn.functional.cosine_similarity((w1 - w0).flatten(), delta.flatten(), dim=0).item())
        same.append((w1 == w0).float().mean().item())
        blocks = (w0 + delta).reshape(-1, 32)
        steps.append(((blocks.max(1).values - blocks.min(1).values) / 15).median().item())
        sizes.append(delta.abs().median().item())
    return {"tensors": len(err), "rounding_error_over_update": float(np.mean(err)),
            "rounding_error_over_update_range": [float(np.min(err)), float(np.max(err))],
            "cosine_change_update": float(np.mean(cos)), "cosine_change_update_range": [float(np.min(cos)), float(np.max(cos))],
            "share_unchanged": float(np.mean(same)), "median_grid_step": float(np.median(steps)),
            "median_abs_update": float(np.median(sizes))}


GGUF_NAME = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}


if __name__ == "__main__":
    main()
