"""Chapter 7's interactive explorers. Each is a thin ipywidgets shell over pure functions that
return numbers (the tests call them directly) and a matplotlib figure:

    lowrank_summary / lowrank_figure        a real weight's spectrum at rank r
    rank_alpha_summary / rank_alpha_figure  the cached sweep at (r, alpha, lr, rsLoRA)
    memory_summary / memory_figure          predicted memory of a training step

An explorer draws its figure into an Image widget (no Output widget, so the notebook's saved
outputs do not depend on a widget frontend). Where no frontend renders widgets (GitHub, nbviewer,
a plain nbconvert), the same output carries a PNG of the figure at the current settings and a
one-line text, which is what those readers see."""
import base64
import io

import matplotlib

from . import lab, lowrank
from .lora import QKVO
from .memory import LLAMA_LINEARS, config_counts, method_bill, predict_peak_config

MIB, GIB = 2**20, 2**30


def figure_png(fig, dpi=80):
    """The figure as PNG bytes (and closed, so a notebook does not draw it a second time)."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


class Explorer:
    """Controls, a one-line summary and a figure, redrawn whenever a control changes.

    `render(**values)` returns (summary text, matplotlib figure). `update()` is the callback the
    controls call; tests call it too, after setting a control's value."""

    def __init__(self, title, controls, render, buttons=()):
        import ipywidgets as w
        self.title, self.controls, self.render = title, dict(controls), render
        self.summary = w.HTML()
        self.image = w.Image(format="png")
        self.png = b""
        rows = [w.HBox(list(self.controls.values())[i:i + 3]) for i in range(0, len(self.controls), 3)]
        self.box = w.VBox([w.HTML(f"<b>{title}</b>"), *rows, *buttons, self.summary, self.image])
        for control in self.controls.values():
            control.observe(self.update, names="value")
        self.update()

    def values(self):
        return {name: c.value for name, c in self.controls.items()}

    def update(self, change=None):
        text, fig = self.render(**self.values())
        self.png = figure_png(fig)
        self.image.value = self.png
        self.summary.value = text
        return text

    def _repr_mimebundle_(self, **kwargs):
        data = self.box._repr_mimebundle_(**kwargs)
        plain = self.summary.value.replace("<br>", "; ")
        for tag in ("<b>", "</b>", "<i>", "</i>"):
            plain = plain.replace(tag, "")
        data["text/plain"] = f"{self.title}: {plain}"
        data["image/png"] = base64.b64encode(self.png).decode()
        return data


# --- 1. low-rank explorer --------------------------------------------------------------------

def projection_weight(model, layer, projection):
    """The weight of `projection` (q_proj ... down_proj) in decoder layer `layer` of a Llama-style model."""
    if projection not in LLAMA_LINEARS:
        raise ValueError(f"projection must be one of {list(LLAMA_LINEARS)}, got {projection!r}")
    n = model.config.num_hidden_layers
    if not 0 <= layer < n:
        raise ValueError(f"layer must be in [0, {n - 1}], got {layer}")
    part = "self_attn" if projection in QKVO else "mlp"
    return model.get_submodule(f"model.layers.{layer}.{part}.{projection}").weight.detach()


def lowrank_summary(W, r, S=None):
    """What rank r keeps of W: {r, shape, S (singular values), error (relative Frobenius error of
    the best rank-r approximation, Eckart-Young), energy, full_params, lora_params, effective_rank}."""
    S = lowrank.singular_values(W) if S is None else S
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= len(S):
        raise ValueError(f"rank r must be an integer in [1, {len(S)}] for a {tuple(W.shape)} matrix, got {r!r}")
    full, low = lowrank.lora_param_count(W.shape[0], W.shape[1], r)
    return {"r": r, "shape": tuple(W.shape), "S": S, "error": lowrank.eckart_young_error(S, r) / S.norm().item(),
            "energy": lowrank.energy_captured(S, r), "full_params": full, "lora_params": low,
            "effective_rank": lowrank.effective_rank(S)}


def lowrank_figure(summary, name=""):
    import matplotlib.pyplot as plt
    S, r = summary["S"], summary["r"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.semilogy(range(1, len(S) + 1), S.numpy(), lw=1)
    a.axvline(r, color="C3", ls="--", label=f"r = {r}")
    a.set(xlabel="index", ylabel="singular value", title=f"spectrum {name}".strip())
    a.legend()
    energy = lowrank.energy_captured(S).numpy()
    b.plot(range(1, len(S) + 1), 1 - energy, lw=1)
    b.axvline(r, color="C3", ls="--")
    b.set(xlabel="rank r", ylabel="relative error$^2$ (1 - energy)", title="what a rank-r approximation loses")
    fig.tight_layout()
    return fig


def lowrank_text(s, name):
    return (f"<b>{name}</b> {s['shape'][0]}x{s['shape'][1]} at r = {s['r']}: relative error {s['error']:.3f}, "
            f"energy kept {s['energy']:.1%}, parameters {s['lora_params']:,} of {s['full_params']:,} "
            f"({s['lora_params'] / s['full_params']:.1%}); effective rank {s['effective_rank']:.0f}")


def lowrank_explorer(model, layer=0, projection="q_proj", r=8):
    """Pick a layer, a projection and a rank of the real model; see its spectrum and what rank r keeps."""
    import ipywidgets as w
    cache = {}

    def render(layer, projection, r):
        if (layer, projection) not in cache:
            W = projection_weight(model, layer, projection)
            cache[layer, projection] = (W, lowrank.singular_values(W))
        W, S = cache[layer, projection]
        W, S = W.cpu(), S.cpu()                            # the figure and the summary are drawn on the CPU
        s = lowrank_summary(W, min(r, len(S)), S)
        name = f"layer {layer} {projection}"
        return lowrank_text(s, name), lowrank_figure(s, name)

    n = model.config.num_hidden_layers
    return Explorer("Low-rank explorer", {
        "layer": w.IntSlider(value=layer, min=0, max=n - 1, description="layer"),
        "projection": w.Dropdown(options=list(LLAMA_LINEARS), value=projection, description="projection"),
        "r": w.IntSlider(value=r, min=1, max=256, description="rank r"),
    }, render)


# --- 2. rank / alpha explorer ----------------------------------------------------------------

def find_run(results, r, alpha, lr, rslora=False, targets="q,v"):
    """The cached run with exactly these settings, or None."""
    return results["runs"].get(lab.run_key(r, alpha, lr, rslora, targets))


def rank_alpha_summary(results, r, alpha, lr, rslora=False, targets="q,v", live=None):
    """The run at these settings (from the cache, or `live`, a dict of runs made by the reader,
    keyed like the cache), and the cached runs at the same r and targets for comparison:
    {key, run (or None), source ("cache", "live" or None), scaling, step_scale (lab.step_scale),
    neighbours (runs at the same r)}."""
    key = lab.run_key(r, alpha, lr, rslora, targets)
    live = live or {}
    run, source = (results["runs"][key], "cache") if key in results["runs"] else (live.get(key), "live" if key in live else None)
    neighbours = [x for k, x in sorted(results["runs"].items()) if x["r"] == r and x["targets"] == targets and k != key]
    s = lab.scaling(r, alpha, rslora)
    return {"key": key, "run": run, "source": source, "scaling": s, "step_scale": lab.step_scale(r, alpha, lr, rslora), "neighbours": neighbours}


def rank_alpha_text(s):
    head = f"<b>{s['key']}</b>: scaling {s['scaling']:.3g}, scaling x r x lr {s['step_scale']:.3g}"
    run = s["run"]
    if run is None:
        return head + "<br><i>not in the cache: press 'train live' to run it (about 1 min on 2 CPU cores)</i>"
    em = f", exact match {run['exact_match']:.0%}" if "exact_match" in run else ""
    return (head + f"<br>{s['source']}: {run['trainable']:,} trainable, final loss {run['losses'][-1]:.3f}, "
            f"test answer loss {run['test_loss']:.3f}{em}")


def rank_alpha_figure(results, s):
    """Left: loss curves at the chosen r (the chosen run bold). Right: every cached run's final
    loss against scaling x r x lr, the product that sets the size of LoRA's early updates."""
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    for x in s["neighbours"]:
        a.plot(range(1, len(x["losses"]) + 1), x["losses"], color="0.75", lw=1)
    if s["run"] is not None:
        losses = s["run"]["losses"]
        a.plot(range(1, len(losses) + 1), losses, color="C3", lw=2.5, ls="-" if s["source"] == "cache" else "--",
               label=s["source"])
        a.legend()
    a.set(xlabel="step", ylabel="training loss", title=f"r = {s['key'].split('r=')[1].split()[0]} (grey: other cached runs)")
    runs = [x for x in results["runs"].values() if x["targets"] == "q,v"]
    xs = [lab.step_scale(x["r"], x["alpha"], x["lr"], x["rslora"]) for x in runs]
    dots = b.scatter(xs, [x["losses"][-1] for x in runs], c=[x["r"] for x in runs], cmap="viridis",
                     norm=matplotlib.colors.LogNorm())
    ranks = sorted({x["r"] for x in runs})
    bar = fig.colorbar(dots, ax=b, label="rank r", ticks=ranks)
    bar.ax.set_yticklabels([str(r) for r in ranks])
    bar.ax.minorticks_off()
    if s["run"] is not None:
        b.scatter([s["step_scale"]], [s["run"]["losses"][-1]], s=160, facecolors="none", edgecolors="C3", lw=2)
    else:
        b.axvline(s["step_scale"], color="C3", ls=":")
    b.set(xscale="log", yscale="log", xlabel="scaling x r x learning rate", ylabel="final training loss",
          title="all cached q,v runs (colour: r)")
    fig.tight_layout()
    return fig


def rank_alpha_explorer(results, train_fn=None, r=8, alpha=16, lr=2e-3, rslora=False):
    """Sliders for r, alpha and the learning rate and an rsLoRA switch over the cached sweep.
    `train_fn(r=, alpha=, lr=, rslora=, on_step=)` -> run dict, if given, backs a 'train live'
    button for settings the cache does not have (its runs are kept in explorer.live)."""
    import ipywidgets as w
    ranks = sorted({x["r"] for x in results["runs"].values()})
    alphas = sorted({x["alpha"] for x in results["runs"].values()})
    lrs = sorted({x["lr"] for x in results["runs"].values()})
    live = {}

    def render(r, alpha, lr, rslora):
        s = rank_alpha_summary(results, r, alpha, lr, rslora, live=live)
        return rank_alpha_text(s), rank_alpha_figure(results, s)

    buttons = []
    if train_fn is not None:
        button = w.Button(description="train live", tooltip="train at these settings now (about 1 min on 2 CPU cores)")
        bar = w.IntProgress(min=0, max=1, description="steps")
        buttons = [w.HBox([button, bar])]
    explorer = Explorer("Rank / alpha explorer", {
        "r": w.SelectionSlider(options=ranks, value=r, description="rank r"),
        "alpha": w.SelectionSlider(options=alphas, value=alpha, description="alpha"),
        "lr": w.SelectionSlider(options=lrs, value=lr, description="lr"),
        "rslora": w.Checkbox(value=rslora, description="rsLoRA"),
    }, render, buttons)
    explorer.live = live
    if train_fn is not None:
        def on_click(_):
            v = explorer.values()
            key = lab.run_key(v["r"], v["alpha"], v["lr"], v["rslora"])
            if key in results["runs"] or key in live:
                return
            button.disabled = True
            try:
                def on_step(step, steps):
                    bar.max, bar.value = steps, step
                live[key] = train_fn(**v, on_step=on_step)
            finally:
                button.disabled = False
            explorer.update()
        button.on_click(on_click)
        explorer.button = button
    return explorer


# --- 3. memory calculator --------------------------------------------------------------------

def model_configs():
    """Llama-style shapes of the models in the calculator (their published configs)."""
    from transformers import LlamaConfig
    def c(h, i, L, heads, kv, V, tied):
        return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=heads,
                           num_key_value_heads=kv, vocab_size=V, tie_word_embeddings=tied)
    return {"SmolLM2-135M": c(576, 1536, 30, 9, 3, 49152, True),
            "SmolLM2-1.7B": c(2048, 8192, 24, 32, 32, 49152, True),
            "Llama-2-7B": c(4096, 11008, 32, 32, 32, 32000, False),
            "Llama-2-13B": c(5120, 13824, 40, 40, 40, 32000, False),
            "Llama-2-70B": c(8192, 28672, 80, 64, 8, 32000, False)}


PARTS = ("weights", "gradients", "optimizer", "activations", "temporaries")


def find_measured(measured, model, method, r, targets, batch, seq):
    """The measured peak (bytes) among `measured` (dicts with model, method, r, targets, batch,
    seq, bytes) at these settings, or None. Full fine-tuning has no r or targets to match."""
    for m in measured or ():
        same = (m["model"], m["method"], m["batch"], m["seq"]) == (model, method, batch, seq)
        if same and (method == "full" or (m["r"], tuple(m["targets"])) == (r, tuple(targets))):
            return m["bytes"]
    return None


def memory_summary(model, method, r=8, targets=QKVO, batch=8, seq=128,
                   measured=None):
    """Predicted peak of one fp32 training step (lk.memory.predict_peak_config) and, for the same
    counts, the QLoRA paper's bf16 accounting of the states (no activations). `measured` (see
    find_measured) supplies measured peaks, shown beside the prediction where settings match."""
    configs = model_configs()
    if model not in configs:
        raise ValueError(f"model must be one of {list(configs)}, got {model!r}")
    if not targets:
        raise ValueError("choose at least one target projection")
    config = configs[model]
    targets = tuple(targets)
    bill = predict_peak_config(config, batch, seq, method, targets, r)
    counts = config_counts(config, method, targets, r)
    paper = method_bill(counts["total"], counts["trainable"], method, counts["quantized"] or None)
    found = find_measured(measured, model, method, r, targets, batch, seq)
    return {"model": model, "method": method, "bill": bill, "counts": counts, "bf16_states": sum(paper.values()),
            "measured": found}


def memory_text(s):
    b, c = s["bill"], s["counts"]
    text = (f"<b>{s['model']}, {s['method']}</b>: {c['trainable']:,} trainable of {c['total']:,}; "
            f"predicted fp32 peak <b>{b['total'] / GIB:.2f} GiB</b> (at the {b['phase']})")
    if s["measured"] is not None:
        text += f", measured in chapter 6: {s['measured'] / GIB:.2f} GiB"
    return text + f"<br>bf16 base, fp32 trained states (QLoRA paper), before activations: {s['bf16_states'] / GIB:.2f} GiB"


def memory_figure(s):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bars = [("predicted", s["bill"])] + ([("measured", None)] if s["measured"] is not None else [])
    for x, (label, bill) in enumerate(bars):
        if bill is None:
            ax.bar(x, s["measured"] / GIB, color="0.4", width=0.5)
            continue
        bottom = 0
        for i, part in enumerate(PARTS):
            v = bill[part] / GIB
            ax.bar(x, v, bottom=bottom, color=f"C{i}", width=0.5, label=part if v > 0 else None)
            bottom += v
    ax.set_xticks(range(len(bars)), [b[0] for b in bars])
    ax.set(ylabel="GiB", title=f"{s['model']}, {s['method']}: one fp32 training step at its peak")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return fig


def memory_calculator(measured=None, model="SmolLM2-135M", method="lora", r=8, targets=QKVO,
                      batch=8, seq=128):
    """Model size, method, r, targets, batch and sequence length; a stacked bar of the predicted peak."""
    import ipywidgets as w

    def render(model, method, r, targets, batch, seq):
        if not targets and method != "full":
            import matplotlib.pyplot as plt
            return "<i>choose at least one target projection (ctrl-click to pick several)</i>", plt.figure(figsize=(7, 1))
        s = memory_summary(model, method, r, targets or LLAMA_LINEARS, batch, seq, measured)
        return memory_text(s), memory_figure(s)

    return Explorer("Memory calculator", {
        "model": w.Dropdown(options=list(model_configs()), value=model, description="model"),
        "method": w.ToggleButtons(options=["full", "lora", "qlora"], value=method, description="method"),
        "r": w.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=r, description="rank r"),
        "targets": w.SelectMultiple(options=list(LLAMA_LINEARS), value=tuple(targets), rows=4, description="targets"),
        "batch": w.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64], value=batch, description="batch"),
        "seq": w.SelectionSlider(options=sorted({64, 96, 128, 256, 512, 1024, 2048, 4096, seq}), value=seq,
                                 description="sequence"),
    }, render)
