"""`small_run`: a whole run in seconds (harvest, one TopK SAE, its analysis), for tests, benchmarks and demos;
`small_models_store`: the store of several models harvested together over the same tokens."""

from __future__ import annotations

from pathlib import Path

from saelab.analysis import AnalysisConfig, analyze
from saelab.config import HarvestConfig
from saelab.harvest import harvest
from saelab.models import Model
from saelab.run import RunDir
from saelab.store import ActivationStore
from saelab.train import Grid, TrainConfig, default_lr, train


def _small_config(run: Path, hooks: list[str], *, tokens: int, context_length: int) -> dict[str, object]:
    """The harvest settings every small store shares: `tokens` rows at `hooks` on the embedded corpus, on the CPU."""
    return {
        "hooks": hooks,
        "out": str(RunDir(run).store),
        "context_length": context_length,
        "batch_size": 32,
        "max_tokens": tokens,
        "shard_rows": 4096,
        "chunk_rows": 1024,
        "device": "cpu",
    }


def small_store(
    run: Path, model: str, hook: str, *, tokens: int = 4096, context_length: int = 32, loaded: Model | None = None
) -> ActivationStore:
    """The store of run `run`: `tokens` rows of `model` at `hook` on the embedded corpus, in contexts of
    `context_length` (`loaded`: the model already loaded, to skip loading it again)."""
    settings = _small_config(run, [hook], tokens=tokens, context_length=context_length)
    return harvest(HarvestConfig.model_validate(settings | {"model": model}), model=loaded, progress=False)


def small_models_store(
    run: Path, models: dict[str, str], hooks: list[str], *, tokens: int = 4096, context_length: int = 32
) -> ActivationStore:
    """The store of run `run` harvested from several `models` (alias -> spec) together: `tokens` rows of each at
    every hook point of `hooks` (arrays `<alias>/<hook>`) on the embedded corpus, in contexts of `context_length`."""
    settings = _small_config(run, hooks, tokens=tokens, context_length=context_length)
    return harvest(HarvestConfig.model_validate(settings | {"models": models}), progress=False)


def small_run(root: Path, model: str, hook: str, *, k: int, expansion: int = 2, analysed: bool) -> Path:
    """A run at `root/run`: 4k tokens of `model` (a spec `saelab.load_model` takes) at `hook` (`small_store`), one
    TopK SAE (`k`, `expansion`) trained on 10k tokens at Gao et al.'s rate (`default_lr(width)`: the rate the steering
    and app tests that read particular latents of these runs were written against, not the short-run floor a 20-step
    run gets by default), and its feature analysis when `analysed`."""
    run = root / "run"
    store = small_store(run, model, hook)
    train(
        TrainConfig(
            store=store.path,
            run=str(run),
            tokens=512 * 20,
            batch_size=512,
            eval_rows=1024,
            warmup_steps=5,
            grid=Grid(k=[k], expansion=[expansion], lr=[default_lr(expansion * store.d(hook))]),
            device="cpu",
        ),
        progress=False,
    )
    if analysed:
        analyze(str(run), AnalysisConfig(device="cpu"), progress=False)
    return run
