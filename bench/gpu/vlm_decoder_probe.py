"""Issue 19 probe: can ONNX Runtime GenAI's model builder write the Qwen3-VL decoder that enginekit needs, as ONE
graph (weights held once, prefill and decode in the same session), and what does it cost at the 8B geometry?

    python3 bench/gpu/vlm_decoder_probe.py --out $OUT                       # H200: Qwen3-VL-8B geometry, BF16
    python bench/gpu/vlm_decoder_probe.py --out /tmp/p --geometry tiny --device cpu --precision fp32

Steps (each result goes to OUT/vlm_decoder_probe.json as soon as it is known; a failing step is recorded):
1. A Qwen3-VL with random weights (tests/models/vlm.py's tiny config, or Qwen3-VL-8B-Instruct's published
   geometry: 36 decoder layers of 4096, vocab 151936, deepstack after vision layers 8/16/24), saved.
2. transformers, eager, the same precision: the prompt's embeddings with one image spliced in (image features
   from the vision tower of a scikit-image photo resized to 448×448 for 8B: 196 image tokens; + a 32-token
   question), M-RoPE positions (get_rope_index), the dense deepstack features, the last position's logits
   of the full forward, and greedy generate() of NEW tokens timed (the issue's eager baseline).
3. GenAI's builder with exclude_embeds=true (decoder on inputs_embeds, 3-D position_ids; its Qwen3VLTextModel
   has no deepstack input), then a rewrite (onnx protobuf, weights untouched): a `deepstack_embeds [levels,
   batch, sequence, hidden]` input, level i added to decoder layer i's MLP output before the next layer's
   SkipSimplifiedLayerNormalization, as transformers adds it to the hidden states at the image tokens.
4. In a fresh process (so its GPU memory is its own): that graph on ORT with IO binding, prefill with an empty
   past and the whole prompt, then greedy decode steps of one token (zero deepstack) in the same session:
   prefill logits vs transformers', tokens vs generate()'s, time to first token, decode tok/s, and the GPU
   memory the process used (nvidia-smi, polled; includes torch's CUDA context, which a torch-free runtime
   would not have). No CUDA graph, no GenAI runtime: ORT's plain session.
The vision tower is not exported or timed here (its engine is enginekit's, exporter/export/vlm.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import genai_probe  # noqa: E402  (bench/gpu/genai_probe.py: the builder call, its log and cache)

NEW = 64
QUESTION = 32
ONNX_BF16, ONNX_FP16, ONNX_FP32, ONNX_INT64 = 16, 10, 1, 7


class Record:
    def __init__(self, path: Path):
        self.path, self.data = path, {"command": " ".join(["python3", "bench/gpu/vlm_decoder_probe.py", *sys.argv[1:]]),
                                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def put(self, key: str, value: object) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
        print(f"{key}: {json.dumps(value, default=str)[:400]}", flush=True)


def make_model(folder: Path, geometry: str, device: str, dtype: object) -> object:
    import torch
    import transformers

    from tests.models.vlm import _save_processor, _special_ids, tiny_qwen3_vl, tiny_vl_tokenizer

    if geometry == "tiny":
        tiny_qwen3_vl(folder)
        return transformers.Qwen3VLForConditionalGeneration.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    folder.mkdir(parents=True, exist_ok=True)
    ids = tiny_vl_tokenizer(folder)  # a tiny tokenizer: the token ids are what the probe feeds, not text
    cfg = transformers.Qwen3VLConfig(  # Qwen3-VL-8B-Instruct's config.json (geometry only)
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                             "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                         eos_token_id=0, pad_token_id=0, bos_token_id=0, tie_word_embeddings=False),
        vision_config=dict(depth=27, hidden_size=1152, out_hidden_size=4096, num_heads=16, intermediate_size=4304,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           deepstack_visual_indexes=[8, 16, 24]),
        **_special_ids(ids), eos_token_id=0, pad_token_id=0, bos_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen3VLForConditionalGeneration._from_config(cfg, dtype=dtype).eval()
    model.save_pretrained(folder)
    _save_processor(folder, patch_size=16, min_pixels=64 * 64, max_pixels=1024 * 1024, merge_size=2,
                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return model


def reference(model: object, folder: Path, geometry: str, work: Path, rec: Record) -> dict:
    """transformers' side: inputs for the ONNX decoder (saved to work/inputs.pt) and what it must reproduce."""
    import skimage.data
    import torch
    import transformers
    from PIL import Image

    side = 448 if geometry == "8b" else 64
    proc = transformers.AutoImageProcessor.from_pretrained(str(folder))
    pi = proc(images=[Image.fromarray(skimage.data.astronaut()).resize((side, side))], return_tensors="pt")
    dev = next(model.parameters()).device
    grid, pixels = pi["image_grid_thw"].to(dev), pi["pixel_values"].to(dev)
    n_img = int(grid.prod() // 4)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    question = torch.randint(10, 300, (QUESTION,), generator=g)
    ids = torch.cat([torch.tensor([cfg.vision_start_token_id]), torch.full((n_img,), cfg.image_token_id),
                     torch.tensor([cfg.vision_end_token_id]), question])[None].to(dev)
    mm = (ids == cfg.image_token_id).int()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        vis = model.model.get_image_features(pixels, grid)
        feats = torch.cat(list(vis.pooler_output), 0)
        deep = [torch.cat(list(x), 0) for x in vis.deepstack_features]
        emb = model.model.get_input_embeddings()(ids)
        sel = (ids == cfg.image_token_id)[0]
        emb[0, sel] = feats.to(emb.dtype)
        dense = torch.zeros((len(deep), 1, ids.shape[1], emb.shape[-1]), dtype=emb.dtype, device=dev)
        for i, d in enumerate(deep):
            dense[i, 0, sel] = d.to(emb.dtype)
        pos, _ = model.model.get_rope_index(ids, mm, grid, None, attention_mask=mask)
        logits = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm,
                       attention_mask=mask).logits[0, -1].float()
        kw = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm, attention_mask=mask,
                  max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        model.generate(**kw, max_length=None)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        tokens = model.generate(**kw, max_length=None)[0, ids.shape[1]:]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        eager_s = time.perf_counter() - t
    torch.save({"inputs_embeds": emb.cpu(), "deepstack_embeds": dense.cpu(), "position_ids": pos.cpu(),
                "logits": logits.cpu(), "tokens": tokens.cpu(), "embed_tokens": model.model.get_input_embeddings().weight.cpu(),
                "next_position": int(pos.max()) + 1}, work / "inputs.pt")
    out = {"image_tokens": n_img, "prompt_tokens": int(ids.shape[1]), "new_tokens": NEW, "eager_generate_s": round(eager_s, 3),
           "eager_decode_tok_s_incl_prefill": round(NEW / eager_s, 1)}
    rec.put("transformers_eager", out)
    return out


def build_decoder(folder: Path, out: Path, precision: str, device: str, levels: int, hidden: int, rec: Record) -> Path:
    import onnx
    from onnx import TensorProto, helper

    from exporter.export.genai import op_counts

    built = genai_probe.build(folder, out, device, precision, ["exclude_embeds=true"])
    path = out / "model.onnx"
    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    emb = next(i for i in g.input if i.name == "inputs_embeds")
    elem = emb.type.tensor_type.elem_type
    g.input.append(helper.make_tensor_value_info("deepstack_embeds", elem, [levels, "batch_size", "sequence_length", hidden]))
    nodes = list(g.node)
    for i in range(levels):
        k = next(j for j, n in enumerate(nodes) if n.op_type == "SkipSimplifiedLayerNormalization"
                 and n.name.startswith(f"/model/layers.{i + 1}/"))
        target = nodes[k]
        idx = helper.make_node("Constant", [], [f"/model/deepstack.{i}/index"],
                               value=helper.make_tensor("v", TensorProto.INT64, [], [i]))
        gather = helper.make_node("Gather", ["deepstack_embeds", idx.output[0]], [f"/model/deepstack.{i}/level"], axis=0)
        # The skip input may already be cast to FP32 (the builder computes these LayerNorms in FP32): match it.
        cast_to = next((a.i for n in nodes if target.input[1] in n.output and n.op_type == "Cast" for a in n.attribute
                        if a.name == "to"), elem)
        level = helper.make_node("Cast", [gather.output[0]], [f"/model/deepstack.{i}/cast"], to=cast_to)
        add = helper.make_node("Add", [target.input[1], level.output[0]], [f"/model/deepstack.{i}/sum"])
        target.input[1] = add.output[0]
        nodes[k:k] = [idx, gather, level, add]
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(m, str(path))  # the graph only: the builder's external weights file is untouched
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    rec.put("genai_builder", {"seconds": built, "folder_gb": round(size / 1e9, 2), "ops": op_counts(m),
                              "inputs": [i.name for i in g.input][:4], "deepstack_levels_added": levels})
    return path


def run_onnx(path: Path, work: Path, device: str, elem: int) -> dict:
    """Child process: ORT session on the rewritten graph, prefill + greedy decode with IO binding."""
    import onnxruntime as ort
    import torch

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    tdt = {ONNX_BF16: torch.bfloat16, ONNX_FP16: torch.float16, ONNX_FP32: torch.float32}[elem]
    x = torch.load(work / "inputs.pt")
    table = x["embed_tokens"].to(tdt)  # stays on the host, as enginekit's runtime keeps embed_tokens.npy
    t0 = time.perf_counter()
    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(path), providers=providers)
    load_s = time.perf_counter() - t0
    names = [i.name for i in sess.get_inputs()]
    presents = [o.name for o in sess.get_outputs() if o.name.startswith("present")]
    past = [n.replace("present", "past_key_values", 1) for n in presents]  # each step's presents, in this order
    assert set(past) <= set(names), (past, names)
    kv_shape = next(i.shape for i in sess.get_inputs() if i.name == past[0])
    heads, head_dim = int(kv_shape[1]), int(os.environ["HEAD_DIM"])
    vocab = sess.get_outputs()[0].shape[-1]
    ldt, lel = (torch.float32, ONNX_FP32) if sess.get_outputs()[0].type == "tensor(float)" else (tdt, elem)  # builder: FP32 logits
    kind = "cuda" if device == "cuda" else "cpu"

    def step(embeds: object, deep: object, pos: object, total: int, kv: list[object] | None) -> tuple[object, list[object]]:
        io = sess.io_binding()
        s = embeds.shape[1]
        feeds = {"inputs_embeds": embeds.to(dev).contiguous(), "deepstack_embeds": deep.to(dev).contiguous(),
                 "position_ids": pos.to(dev).long().contiguous(), "attention_mask": torch.ones((1, total), dtype=torch.long, device=dev)}
        for k, v in feeds.items():
            et = elem if v.dtype == tdt else ONNX_INT64
            io.bind_input(k, kind, 0, et, list(v.shape), v.data_ptr())
        if kv is None:
            empty = torch.zeros((1, heads, 0, head_dim), dtype=tdt, device=dev)
            for n in past:
                io.bind_input(n, kind, 0, elem, list(empty.shape), empty.data_ptr())
        else:
            for n, v in zip(past, kv):
                io.bind_ortvalue_input(n, v)
        logits = torch.empty((1, s, vocab), dtype=ldt, device=dev)
        io.bind_output("logits", kind, 0, lel, list(logits.shape), logits.data_ptr())
        for n in presents:
            io.bind_output(n, kind)
        sess.run_with_iobinding(io)
        return logits, io.get_outputs()[1:]

    levels, hidden = x["deepstack_embeds"].shape[0], x["inputs_embeds"].shape[-1]
    n = x["inputs_embeds"].shape[1]

    def generate() -> tuple[list[int], float, float, object]:
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        logits, kv = step(x["inputs_embeds"].to(tdt), x["deepstack_embeds"].to(tdt), x["position_ids"], n, None)
        first_logits = logits[0, -1].float().cpu()
        tok = int(logits[0, -1].argmax())
        sync()
        ttft = time.perf_counter() - t
        toks, nxt = [tok], x["next_position"]
        zero = torch.zeros((levels, 1, 1, hidden), dtype=tdt)
        t = time.perf_counter()
        for k in range(NEW - 1):
            pos = torch.full((3, 1, 1), nxt + k, dtype=torch.long)
            logits, kv = step(table[tok][None, None], zero, pos, n + k + 1, kv)
            tok = int(logits[0, -1].argmax())
            toks.append(tok)
        sync()
        return toks, ttft, time.perf_counter() - t, first_logits

    generate()  # warm-up
    runs = [generate() for _ in range(3)]
    toks, _, _, first = runs[0]
    ref, ref_tokens = x["logits"], x["tokens"].tolist()
    rel = float((first - ref).norm() / ref.norm())
    same = next((i for i, (a, b) in enumerate(zip(toks, ref_tokens)) if a != b), len(toks))
    ttft = sorted(r[1] for r in runs)[1]
    dec = sorted(r[2] for r in runs)[1]
    return {"session_load_s": round(load_s, 1), "prefill_logits_rel_l2_vs_transformers": rel,
            "top1_equal": int(first.argmax()) == int(ref.argmax()), "tokens_equal_to_generate_for_steps": same,
            "time_to_first_token_ms": round(ttft * 1e3, 2), "decode_tok_s": round((NEW - 1) / dec, 1),
            "total_s_prefill_plus_decode": round(ttft + dec, 3), "runs": 3,
            "ort": ort.__version__, "provider": providers[0]}


def gpu_used_mb() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else -1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--geometry", choices=["8b", "tiny"], default="8b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vlm-probe"))
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    elem = {"bf16": ONNX_BF16, "fp16": ONNX_FP16, "fp32": ONNX_FP32}[a.precision]
    if a.child:
        (a.work / "child.json").write_text(json.dumps(run_onnx(a.work / "genai" / "model.onnx", a.work, a.device, elem)))
        return
    rec = Record(a.out / "vlm_decoder_probe.json")
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.precision]
    folder = a.work / "hf"
    try:
        t = time.perf_counter()
        model = make_model(folder, a.geometry, a.device, dtype)
        cfg = model.config
        rec.put("model", {"geometry": a.geometry, "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                          "precision": a.precision, "seconds": round(time.perf_counter() - t, 1)})
        reference(model, folder, a.geometry, a.work, rec)
        levels, hidden = len(cfg.vision_config.deepstack_visual_indexes), cfg.text_config.hidden_size
        head_dim = cfg.text_config.head_dim
        del model
        if a.device == "cuda":
            torch.cuda.empty_cache()
        build_decoder(folder, a.work / "genai", a.precision, a.device, levels, hidden, rec)
        for f in folder.glob("*.safetensors"):
            f.unlink()  # disk: the checkpoint is not needed any more
        base = gpu_used_mb() if a.device == "cuda" else 0
        peak = [base]
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], gpu_used_mb())
                time.sleep(0.05)

        th = threading.Thread(target=poll, daemon=True)
        if a.device == "cuda":
            th.start()
        env = dict(os.environ, HEAD_DIM=str(head_dim))
        child = subprocess.run([sys.executable, __file__, "--child", "--out", str(a.out), "--work", str(a.work),
                                "--device", a.device, "--precision", a.precision], env=env, capture_output=True, text=True)
        done.set()
        if child.returncode != 0:
            rec.put("onnx_decoder", {"error": child.stderr[-3000:]})
            return
        res = json.loads((a.work / "child.json").read_text())
        if a.device == "cuda":
            res["gpu_memory_peak_gb"] = round((peak[0] - base) / 1024, 2)
            res["gpu_memory_note"] = ("nvidia-smi memory.used, peak during the child process minus before it; "
                                      "includes the child's torch CUDA context (about 0.5 GB)")
        rec.put("onnx_decoder", res)
    except Exception:
        rec.put("error", traceback.format_exc()[-3000:])


if __name__ == "__main__":
    main()
