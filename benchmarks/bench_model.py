"""Training speed of massreg's models, the DeepViT against vit-pytorch's (the reference it must equal).

    python benchmarks/bench_model.py [--presets seed,small] [--steps 10] [--device cuda --bf16 --compile]
    python benchmarks/bench_model.py --presets tiny,hybrid,resnet --threads 1

One training step = forward + backward + Adam step, MSE on random targets, on random images (B, C, 125, 125).
A preset with a vit-pytorch counterpart (a DeepViT with the linear patch embedding: seed, small, tiny) is
timed against it; the others (the conv-stem DeepViTs, the ResNets) are timed alone. Both models get the same
configuration (the preset's) and optimiser. After a few warm-up steps the two are
timed in alternating rounds (who goes first alternates too), so that the load of a shared machine falls on
both alike; the table gives each model's median samples/s and the median over rounds of the paired ratio
ours / reference. On the CPU it also gives that ratio in process CPU time, which a busy shared machine
disturbs less than wall-clock time (a descheduled process accrues none); `--threads 1` steadies it further.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from massreg.registry import PRESETS, build_model, model_config  # noqa: E402

DEFAULT_BATCH = {"seed": 32, "small": 64, "tiny": 128, "hybrid": 64, "hybrid49": 64, "hybrid-seed": 32,
                 "resnet": 64, "resnet-wide": 64}


@dataclass
class BenchConfig:
    presets: tuple[str, ...] = ("seed", "small")
    device: str = "cpu"
    bf16: bool = False             # autocast to bfloat16 (CUDA only)
    compile: bool = False          # torch.compile both models
    steps: int = 10                # timed steps per model
    round_steps: int = 0           # steps per timed round; 0: 1 on the CPU, 10 on CUDA (where a step is ms)
    warmup: int = 3                # untimed steps per model first (and the compilation, with --compile)
    batch_size: int = 0            # 0: DEFAULT_BATCH of the preset
    channels: int = 4
    threads: int = 0               # torch.set_num_threads on the CPU; 0: torch's default
    seed: int = 0
    batch_sizes: dict = field(default_factory=dict)   # filled in: preset -> batch used


class BenchError(Exception):
    """A benchmark that cannot run as asked (bad option combination, no CUDA, no vit-pytorch)."""


def load_reference_deepvit():
    """vit-pytorch's DeepViT class, loaded from deepvit.py by path (its __init__ imports torchvision)."""
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None:
        raise BenchError("vit-pytorch is not installed: pip install --no-deps vit-pytorch (as make setup)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "deepvit.py")
    name = "vit_pytorch_deepvit_reference"
    if name not in sys.modules:             # registered: torch.compile re-imports a traced module by name
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    return sys.modules[name].DeepViT


class ReferenceRegressor(torch.nn.Module):
    """vit-pytorch's DeepViT with one output, squeezed to (B,) like ours, so both see the same loss."""

    def __init__(self, cfg: dict):
        super().__init__()
        keep = ("image_size", "patch_size", "channels", "dim", "depth", "heads", "dim_head", "mlp_dim",
                "dropout", "emb_dropout")
        self.net = load_reference_deepvit()(num_classes=1, **{k: cfg[k] for k in keep})

    def forward(self, img):
        return self.net(img).squeeze(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_preset(preset: str, config: BenchConfig) -> dict:
    """Time training steps of both models at one preset: medians, ratio and the raw per-round numbers."""
    device = torch.device(config.device)
    batch = config.batch_size or DEFAULT_BATCH.get(preset, 32)
    round_steps = config.round_steps or (10 if device.type == "cuda" else 1)
    rounds = max(1, -(-config.steps // round_steps))
    cfg = model_config(preset, channels=config.channels)
    torch.manual_seed(config.seed)
    models = {"massreg": build_model(cfg)}
    if has_reference(cfg):
        models = {"reference": ReferenceRegressor(asdict(cfg)), **models}
    g = torch.Generator().manual_seed(config.seed)
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    y = torch.randn(batch, generator=g).to(device)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    steps = {}
    for name, model in models.items():
        model.to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        run = torch.compile(model) if config.compile else model

        def step(run=run, opt=opt):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                loss = torch.nn.functional.mse_loss(run(x).float(), y)
            loss.backward()
            opt.step()
        steps[name] = step

    for name in models:
        for _ in range(config.warmup):
            steps[name]()
    _sync(device)

    rates = {name: [] for name in models}                 # samples/s per round, wall clock
    cpu_rates = {name: [] for name in models}             # samples per CPU-second of this process
    order = list(models)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(round_steps):
                steps[name]()
            _sync(device)
            rates[name].append(batch * round_steps / (time.perf_counter() - t0))
            cpu_rates[name].append(batch * round_steps / max(time.process_time() - c0, 1e-9))
    result = {"preset": preset, "batch": batch, "params": params["massreg"], "tokens": cfg.tokens(),
              "params_equal": None, "rounds": rounds, "round_steps": round_steps,
              "reference_samples_s": None, "massreg_samples_s": statistics.median(rates["massreg"]),
              "ratio": None, "ratio_min": None, "ratio_max": None, "cpu_time_ratio": None,
              "raw": rates, "raw_cpu": cpu_rates}
    if "reference" in models:
        ratios = [a / b for a, b in zip(rates["massreg"], rates["reference"])]
        cpu_ratios = [a / b for a, b in zip(cpu_rates["massreg"], cpu_rates["reference"])]
        result.update(params_equal=params["massreg"] == params["reference"],
                      reference_samples_s=statistics.median(rates["reference"]),
                      ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                      cpu_time_ratio=statistics.median(cpu_ratios) if device.type == "cpu" else None)
    return result


def has_reference(cfg) -> bool:
    """vit-pytorch has this model: a DeepViT with the linear patch embedding and its patch LayerNorm."""
    return cfg.family == "deepvit" and cfg.stem == "patch" and cfg.patch_norm


def run_bench(config: BenchConfig) -> list[dict]:
    """Check the options, then benchmark every preset in turn."""
    unknown = [p for p in config.presets if p not in PRESETS]
    if unknown:
        raise BenchError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    if config.device not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu or cuda, got {config.device!r}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda but torch sees no CUDA device; run with --device cpu")
    if config.bf16 and config.device != "cuda":
        raise BenchError("--bf16 needs --device cuda (bfloat16 autocast on this CPU would time emulation)")
    if config.steps < 1 or config.warmup < 0 or config.threads < 0:
        raise BenchError("--steps must be >= 1, --warmup and --threads >= 0")
    if config.threads:
        torch.set_num_threads(config.threads)
    if any(has_reference(model_config(p)) for p in config.presets):
        load_reference_deepvit()
    results = []
    for preset in config.presets:
        results.append(bench_preset(preset, config))
        config.batch_sizes[preset] = results[-1]["batch"]
    return results


def format_table(results: list[dict], config: BenchConfig) -> str:
    device = (torch.cuda.get_device_name() if config.device == "cuda"
              else f"cpu, {torch.get_num_threads()} threads")

    def num(value, spec):                 # "-" where a preset has no reference to compare with
        return "-" if value is None else format(value, spec)

    lines = [f"device: {device}; torch {torch.__version__}; bf16={config.bf16} compile={config.compile}",
             f"{'preset':<11} {'batch':>5} {'params':>11} {'tokens':>6} {'reference/s':>12} "
             f"{'massreg/s':>10} {'ratio':>6}  {'ratio range':>11}  {'cpu-time ratio':>14}  rounds x steps"]
    for r in results:
        span = "-" if r["ratio"] is None else f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}"
        lines.append(f"{r['preset']:<11} {r['batch']:>5} {r['params']:>11,} {num(r['tokens'], 'd'):>6} "
                     f"{num(r['reference_samples_s'], '.1f'):>12} {r['massreg_samples_s']:>10.1f} "
                     f"{num(r['ratio'], '.3f'):>6}  {span:>11}  {num(r['cpu_time_ratio'], '.3f'):>14}"
                     f"  {r['rounds']} x {r['round_steps']}")
    lines.append("samples/s: median over rounds of training steps (forward + backward + Adam);\n"
                 "ratio: median over rounds of massreg / reference, timed back to back (presets with a\n"
                 "vit-pytorch counterpart only); cpu-time ratio: the same in samples per CPU-second")
    return "\n".join(lines)


@click.command()
@click.option("--presets", default="seed,small", show_default=True, help="Comma-separated model presets.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--bf16", is_flag=True, help="Autocast to bfloat16 (CUDA only).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile both models.")
@click.option("--steps", default=10, show_default=True, help="Timed steps per model.")
@click.option("--round-steps", default=0, help="Steps per timed round (default 1 on cpu, 10 on cuda).")
@click.option("--warmup", default=3, show_default=True, help="Untimed steps per model first.")
@click.option("--batch-size", default=0,
              help="Override the batch (default: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH.items()) + ").")
@click.option("--channels", default=4, show_default=True)
@click.option("--threads", default=0, help="torch.set_num_threads (CPU); default: torch's choice.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write results and config as JSON here.")
def main(presets, device, bf16, compile_, steps, round_steps, warmup, batch_size, channels, threads, out):
    """Training samples/s of massreg's models (the DeepViT vs vit-pytorch's at the same configuration)."""
    config = BenchConfig(presets=tuple(p.strip() for p in presets.split(",") if p.strip()), device=device,
                         bf16=bf16, compile=compile_, steps=steps, round_steps=round_steps, warmup=warmup,
                         batch_size=batch_size, channels=channels, threads=threads)
    try:
        results = run_bench(config)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(format_table(results, config))
    click.echo("command: " + " ".join(shlex.quote(a) for a in ["python"] + sys.argv))
    if out:
        tmp = Path(out).with_name(Path(out).name + ".tmp")
        tmp.write_text(json.dumps({"config": asdict(config), "torch": torch.__version__, "results": results},
                                  indent=1))
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
