"""The `saelab` command line: a thin layer over the library."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional, TypeVar

import typer

from saelab.errors import ConfigError, MissingError, SaelabError

if TYPE_CHECKING:
    from saelab.train import TrainedSAE

app = typer.Typer(
    help="saelab: harvest activations, train sparse autoencoders, analyse and browse features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

SET_HELP = (
    "Override a config key, e.g. --set batch_size=64 --set text.source=files (repeatable). Quote or bracket a "
    "key part that holds dots: --set 'saes[\"blocks.0.attn.hook_z\"]=PATH' or --set \"saes['blocks.0.attn.hook_z']=PATH\"."
)

Overrides = Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
ConfigFile = Annotated[
    Path, typer.Argument(metavar="CONFIG", help="The command's config (YAML; examples in configs/).")
]
Host = Annotated[
    str,
    typer.Option(
        "--host", help="Address to bind; 127.0.0.1 keeps it on this machine, anything else needs --allow-remote."
    ),
]
AllowRemote = Annotated[
    bool,
    typer.Option(
        "--allow-remote",
        help="Bind a non-loopback --host (e.g. 0.0.0.0): the app has no authentication, so anyone who reaches it "
        "can read the run. For shared use, see the README's gunicorn + reverse proxy setup instead.",
    ),
]

F = TypeVar("F", bound=Callable[..., None])


def reports_errors(command: F) -> F:
    """Print a `SaelabError` as one red line on stderr and exit with status 2, without a traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs) -> None:
        try:
            command(*args, **kwargs)
        except SaelabError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return run  # type: ignore[return-value]


def command(name: str | None = None) -> Callable[[F], F]:
    """`app.command(name)` for a function whose `SaelabError`s are reported by `reports_errors`."""

    def register(fn: F) -> F:
        return app.command(name)(reports_errors(fn))

    return register


@command()
def harvest(
    config: Path = typer.Argument(..., help="Harvest config (YAML), e.g. configs/harvest_minilm.yaml."),
    set_: Overrides = None,
    quiet: Quiet = False,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the store at `out` instead of resuming it (only a saelab store)."
    ),
) -> None:
    """Run a model over text and write activations of the chosen hook points to a Zarr store (resumable).
    Under `torchrun --nproc-per-node N -m saelab harvest CONFIG` the ranks share the shards (the same store)."""
    from saelab.config import HarvestConfig, load_config
    from saelab.distributed import ranks
    from saelab.harvest import harvest as run_harvest

    cfg = load_config(config, HarvestConfig, set_ or [])
    store = run_harvest(cfg, progress=not quiet, overwrite=overwrite)
    if ranks().main:  # rank 0 wrote it
        typer.echo(store.summary())


@command()
def info(
    store: str = typer.Argument(..., help="Store path or fsspec URL, or a run directory (its store)."),
    verify: bool = typer.Option(
        False, "--verify", help="Read every shard and check its checksum; exit status 2 when any is damaged."
    ),
) -> None:
    """Print a summary of an activation store (with --verify: and whether every shard is intact)."""
    from saelab.errors import StoreError
    from saelab.store import ActivationStore

    opened = ActivationStore.open(store)
    typer.echo(opened.summary())
    if verify:
        check = opened.check()
        typer.echo(f"verify       {check.describe()}")
        if check.damaged:
            raise StoreError(f"{len(check.damaged)} damaged shards in {store}; {check.fix}")


@command("hooks")
def hooks_cmd(
    model: str = typer.Argument(
        "minilm", help="Model spec: 'minilm', a local checkpoint folder, or a TransformerLens name."
    ),
) -> None:
    """List the hook points a model offers for harvesting."""
    from saelab.models import hook_points, load_model

    m = load_model(model, device="cpu")
    typer.echo("\n".join(hook_points(m)))


@command("import")
def import_cmd(
    path: Path = typer.Argument(..., help="A .npy file or a .safetensors file of 2-D arrays [n_rows, d]."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Store path or fsspec URL to create."),
    run: Optional[Path] = typer.Option(None, "--run", help="Instead of --out: a run directory to put the store in."),
    key: Optional[list[str]] = typer.Option(
        None, "--key", help="Tensor(s) to take from a .safetensors file (default: all 2-D)."
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="Name for the array in the store (default: file stem or tensor key)."
    ),
    dtype: str = typer.Option("float32", "--dtype", help="float16, bfloat16 or float32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store at --out."),
) -> None:
    """Turn vectors you already have (e.g. sentence embeddings) into a store that SAEs can train on."""
    from saelab.importer import import_arrays, read_arrays
    from saelab.run import RunDir
    from saelab.store import STORAGE_DTYPE

    if dtype not in STORAGE_DTYPE:
        raise ConfigError(f"--dtype {dtype!r} is not one of {sorted(STORAGE_DTYPE)}; pick one of those")
    if (out is None) == (run is None):
        raise ConfigError("say where the store goes: --run RUN_DIR (the store goes inside it) or --out STORE_PATH")
    target = str(RunDir(run).store) if run is not None else str(out)
    store = import_arrays(read_arrays(path, key, name), target, dtype=dtype, source=str(path), overwrite=overwrite)
    typer.echo(store.summary())


def _train(config: Path, set_: list[str] | None, quiet: bool) -> tuple[list[TrainedSAE], str]:
    from saelab.config import load_config
    from saelab.train import TrainConfig, train

    cfg = load_config(config, TrainConfig, set_ or [])
    return train(cfg, progress=not quiet), cfg.run


def _print_results(results: list[TrainedSAE]) -> None:
    typer.echo(f"{'hook':<28} {'variant':<30} {'FVU':>7} {'L0':>6} {'dead':>6} {'dense':>6}")
    for r in results:
        m = r.reconstruction
        if m is None:
            typer.echo(f"{r.hook:<28} {r.variant:<30} stopped: {r.stopped}")
        else:
            typer.echo(
                f"{r.hook:<28} {r.variant:<30} {m['fvu']:>7.4f} {m['l0']:>6.1f} {m['dead_frac']:>6.3f} {m['dense_frac']:>6.3f}"
            )


@command("train")
def train_cmd(config: ConfigFile, set_: Overrides = None, quiet: Quiet = False) -> None:
    """Train SAEs on a store (every hook x grid point in one pass); rerun the same command to resume.
    CONFIG: e.g. configs/train_minilm.yaml. Under `torchrun --nproc-per-node N -m saelab train CONFIG` the ranks share
    the SAEs or each batch (`parallel` in the config)."""
    from saelab.distributed import ranks

    results, _ = _train(config, set_, quiet)
    if ranks().main:  # under torchrun every rank has every result; rank 0 prints them
        _print_results(results)


@command()
def sweep(config: ConfigFile, set_: Overrides = None, quiet: Quiet = False) -> None:
    """Train a grid of SAEs, then write results.csv and a Pareto plot (pareto.html) into the run directory.
    CONFIG: e.g. configs/sweep_minilm.yaml."""
    from saelab.distributed import ranks
    from saelab.train import write_sweep_outputs

    results, out = _train(config, set_, quiet)
    if not ranks().main:  # under torchrun every rank has every result; rank 0 reports and writes them
        return
    _print_results(results)
    table, figure = write_sweep_outputs([r.row() for r in results], out)
    typer.echo(f"results: {table}\nPareto plot: {figure}")


@command()
def serve(
    run_dir: Path = typer.Argument(..., help="Run directory, as `saelab harvest`, `train` and `analyze` write it."),
    port: int = typer.Option(8050, "--port", help="Port to listen on."),
    host: Host = "127.0.0.1",
    allow_remote: AllowRemote = False,
) -> None:
    """Browse a run's SAEs and features in a web app (Dash) at http://HOST:PORT/."""
    from saelab.dashboards.app import serve as serve_app
    from saelab.dashboards.wsgi import check_host

    warning = check_host(host, port, allow_remote=allow_remote)  # before anything starts
    if not run_dir.is_dir():
        raise MissingError(f"no run directory {run_dir}; give the folder that `saelab harvest` and `train` wrote into")
    if warning:
        typer.secho(warning, fg=typer.colors.YELLOW, err=True)
    typer.echo(f"serving {run_dir} at http://{host}:{port}/")
    serve_app(str(run_dir), host=host, port=port)


@command()
def analyze(
    target: Path = typer.Argument(
        ..., help="A run directory (its activation store and SAEs), or an analysis config (YAML) naming it in `run`."
    ),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override an analysis setting, e.g. --set n_top=30."),
    quiet: Quiet = False,
) -> None:
    """Compute every feature panel of every SAE in a run, in one streaming pass each; results go into the run.
    Under `torchrun --nproc-per-node N -m saelab analyze TARGET` the ranks share the rows of each SAE."""
    from saelab.analysis import AnalysisConfig
    from saelab.analysis import analyze as run_analysis
    from saelab.config import apply_overrides, build, load_config
    from saelab.distributed import ranks
    from saelab.run import RunDir

    if target.is_dir():
        cfg = build(AnalysisConfig, apply_overrides({"run": str(target)}, set_ or []), "analysis settings")
    elif target.exists():
        cfg = load_config(target, AnalysisConfig, set_ or [])
    else:
        run = RunDir(target)
        raise MissingError(
            f"no run directory or config file {target}; give a run directory (holding {run.store.name} and "
            f"{run.saes_dir.name}/) or an analysis config such as configs/analyze_minilm.yaml"
        )
    written = run_analysis(cfg=cfg, progress=not quiet)
    if ranks().main:  # rank 0 wrote them
        for path in written:
            typer.echo(f"wrote {path}")


def result_command(name: str, *, package: str, config: str, run: str, example: str, doc: str) -> None:
    """Register `saelab NAME CONFIG [--set ...] [--quiet]`: load `package.config` from the YAML file, call
    `package.run` on it, and print each result's summary and the file it went to (the analyses that write one
    result file per config, or one per SAE)."""

    def cmd(
        config_file: Path = typer.Argument(
            ..., metavar="CONFIG", help=f"{name.capitalize()} config (YAML), e.g. {example}."
        ),
        set_: Overrides = None,
        quiet: Quiet = False,
    ) -> None:
        from saelab.config import load_config

        module = importlib.import_module(package)
        found = getattr(module, run)(load_config(config_file, getattr(module, config), set_ or []), progress=not quiet)
        for result, path in found if isinstance(found, list) else [found]:
            typer.echo(f"{result.summary()}\nwrote {path}")

    cmd.__doc__ = doc
    command(name)(cmd)


result_command(
    "circuit",
    package="saelab.circuits",
    config="CircuitConfig",
    run="run_circuit",
    example="configs/circuit_induction.yaml",
    doc="Find a sparse feature circuit (node effects, edges, faithfulness) and write it to RUN/circuits/NAME.json.",
)
result_command(
    "steer",
    package="saelab.steering",
    config="SteerConfig",
    run="run_steering",
    example="configs/steer_induction.yaml",
    doc="Steer a model with an SAE latent over a sweep of coefficients; write RUN/steering/NAME.json.",
)
result_command(
    "absorption",
    package="saelab.absorption",
    config="AbsorptionConfig",
    run="run_absorption",
    example="configs/absorption_minilm.yaml",
    doc="Measure feature absorption (SAEBench's first-letter eval, or your labels) of a run's SAEs; "
    "results in RUN/absorption.",
)


@command("diff")
def diff_cmd(
    run: Path = typer.Argument(..., help="A run directory holding crosscoders over one hook point of two models."),
    sae: Optional[str] = typer.Option(
        None, "--sae", help="HOOK/VARIANT of one crosscoder (default: every crosscoder of the run)."
    ),
    exclusive: float = typer.Option(0.1, help="Relative decoder norm at or below which a latent is one model's."),
    nu_threshold: float = typer.Option(0.3, help="Latent scaling ratio from which an exclusive latent is shared."),
    tuned_on: Optional[str] = typer.Option(
        None,
        "--tuned-on",
        help="The embedded corpus's package the second model was fine-tuned on (`saelab finetune-minilm`): report "
        "how much more each class fires on its documents.",
    ),
) -> None:
    """Classify a crosscoder's latents as shared or exclusive to one model (decoder norms, then latent scaling) on
    the held-out rows; results in RUN/model_diff, shown on the app's Model diff page."""
    from saelab.evals.diff_run import diff_run
    from saelab.run import RunDir, saved_kind

    run_dir = RunDir(run)
    if sae is not None:
        hook, _, variant = sae.rpartition("/")
        chosen = [(hook, variant)]
    else:
        chosen = [(e.hook, e.variant) for e in run_dir.saes() if saved_kind(e.path) == "crosscoder"]
        if not chosen:
            raise MissingError(
                f"the run {run} has no crosscoders; train one with `crosscoders:` in a train config (`run: {run}`)"
            )
    for hook, variant in chosen:
        result, path = diff_run(run, hook, variant, exclusive=exclusive, nu_threshold=nu_threshold, tuned_on=tuned_on)
        typer.echo(f"{result.summary()}\nwrote {path}")


@command("eval")
def eval_cmd(
    run: Path = typer.Argument(..., help="A run directory with trained SAEs."),
    only: str = typer.Option(
        "sparse_probing,hedging,families",
        "--only",
        help="The evals to run, comma-separated: sparse_probing, hedging, families, labels (after `saelab analyze`).",
    ),
    sae: Optional[str] = typer.Option(None, "--sae", help="HOOK/VARIANT of one SAE (default: every SAE of the run)."),
    max_rows: int = typer.Option(65_536, "--max-rows", help="The store rows the evals read, from the first."),
    hedging_steps: int = typer.Option(200, "--hedging-steps", help="Steps of the hedging protocol's two SAEs."),
    labels: Optional[Path] = typer.Option(
        None, "--labels", help="A token -> class table (JSON or token,class CSV) to probe as well, one-vs-rest."
    ),
    label_latents: int = typer.Option(64, "--label-latents", help="Labels: latents to score (the first that fired)."),
    llm_url: Optional[str] = typer.Option(
        None,
        "--llm-url",
        help="Labels: an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) for an LLM explainer.",
    ),
    llm_model: str = typer.Option("default", "--llm-model", help="Labels: the model name the endpoint serves."),
    llm_key_env: Optional[str] = typer.Option(
        None, "--llm-key-env", help="Labels: the environment variable holding the endpoint's API key, if it needs one."
    ),
) -> None:
    """Evaluate a run's SAEs: k-sparse probing on the embedded corpus's tasks against the raw dimensions, feature
    hedging (Chanin et al.'s protocol), feature families (O'Neill et al.'s co-occurrence hierarchy) and, with
    `--only labels`, the MiniLM detection AUROC of each latent's label (and an LLM's explanations with --llm-url);
    results in RUN/evals/HOOK/VARIANT/EVAL.json, headlines across seeds in RUN/results_by_config.csv."""
    from saelab.evals.endpoint import Endpoint
    from saelab.evals.run_evals import EvalSettings, run_evals

    names = tuple(name.strip() for name in only.split(",") if name.strip())
    settings = EvalSettings(
        only=names,
        max_rows=max_rows,
        hedging_steps=hedging_steps,
        labels=None if labels is None else str(labels),
        label_latents=label_latents,
        endpoint=None if llm_url is None else Endpoint(llm_url, llm_model, api_key_env=llm_key_env),
    )
    chosen = None
    if sae is not None:
        hook, _, variant = sae.rpartition("/")
        chosen = [(hook, variant)]
    done = run_evals(run, settings=settings, saes=chosen)
    for result, path in done.written:
        typer.echo(f"{result.summary()}\nwrote {path}")
    for line in done.skipped:
        typer.secho(f"skipped {line}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"each config across seeds (means, 95% t-intervals): {done.by_config}")


@command("heads")
def heads_cmd(
    run: Path = typer.Argument(
        ...,
        metavar="RUN|CONFIG",
        help="A run directory, or a head-circuit config (YAML: model, run, prompts with their negatives as `patch`).",
    ),
    sae: Optional[str] = typer.Option(
        None,
        "--sae",
        help="HOOK/VARIANT of one dictionary on blocks.L.attn.hook_z: its per-head census only (default: the "
        "composition scores and channels, and the census of every attn.hook_z dictionary of the run).",
    ),
    model: Optional[str] = typer.Option(None, "--model", help="The alias of one model of a store of several."),
    top: int = typer.Option(10, min=1, help="Composing pairs of heads whose channels are decomposed."),
    threshold: float = typer.Option(0.5, help="Share of a latent's DFA that makes it its head's, in the census."),
) -> None:
    """Attention heads of the run: Q/K/V composition scores of every pair of heads of its model and the SVD channels
    of the top pairs (RUN/heads/composition.json, channels.json), and for each dictionary on attn.hook_z how many of
    its latents have most of their direct feature attribution on each head (from its feature analysis); shown on
    the app's Heads page. Given a CONFIG file instead: the task's head circuit by discrete codes (O'Neill & Bui 2024)
    next to activation patching, both timed, written to RUN/heads/NAME.json."""
    from saelab.heads.run import attention_saes, census, composition_run

    if run.is_file():
        from saelab.config import load_config
        from saelab.heads.config import HeadCircuitConfig, run_head_circuit

        found, path = run_head_circuit(load_config(run, HeadCircuitConfig))
        typer.echo(f"wrote {path}")
        typer.echo(
            f"discrete codes ({found.discrete_seconds:.2f} s): {', '.join(found.ranking())}; circuit {found.circuit}"
        )
        if found.p_values:
            chance = ", ".join(f"{head} {p:.3f}" for head, p in zip(found.heads, found.p_values))
            typer.echo(f"p-value of each score against chance (label swaps): {chance}")
        typer.echo(f"patching ({found.patching_seconds:.2f} s): {', '.join(found.patching_ranking())}")
        typer.echo(f"agreement: Pearson {found.pearson:.3f}, Spearman {found.spearman:.3f}")
        return
    if sae is None:
        written = composition_run(run, alias=model, top=top)
        typer.echo(f"wrote {written.scores_path}\nwrote {written.channels_path}")
        for pair, found in zip(written.scores.top_pairs(top), written.channels.channels):
            typer.echo(
                f"{pair.mode} {pair.writer.label} -> {pair.reader.label}  score {pair.score:.3f}  "
                f"top-1 component pair {found.share(1, 1):.0%}, top-4 x top-4 {found.share(4, 4):.0%}"
            )
    hook, _, variant = (sae or "").rpartition("/")
    if sae is not None and not (hook and variant):
        raise ConfigError(f"--sae takes HOOK/VARIANT, e.g. blocks.1.attn.hook_z/topk-k2-w128, not {sae!r}")
    for h, v in [(hook, variant)] if sae is not None else attention_saes(run):
        found = census(run, h, v, threshold=threshold)
        heads = ", ".join(f"{head.label} {n}" for head, n in zip(found.heads, found.counts))
        typer.echo(f"{h}/{v}: latents by head {heads}; mixed {found.mixed}, dead {found.dead}")


@command("graph")
def graph_cmd(
    run: Path = typer.Argument(..., help="A run directory with a transcoder per MLP (saes/blocks.L.hook_mlp_in/...)."),
    prompt: str = typer.Option(..., "--prompt", help="The prompt whose next token the graph explains."),
    name: str = typer.Option("graph", "--name", help="Written to RUN/graphs/NAME.json."),
    model: Optional[str] = typer.Option(None, "--model", help="The model (default: the run's model/ folder)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="The transcoders' variant, when there are several."),
    max_feature_nodes: Optional[int] = typer.Option(None, min=1, help="The most latents visited (default: all)."),
    budget_mb: float = typer.Option(4096.0, "--budget-mb", help="Refuse a graph whose memory estimate exceeds this."),
    held_out: list[str] = typer.Option(
        [], "--held-out", help="A held-out prompt of the same task (repeat it); the graph's faithfulness there."
    ),
    granularity: str = typer.Option(
        "position", "--granularity", help="Held-out nodes kept by position, or by feature (at every position)."
    ),
) -> None:
    """An attribution graph over the run's transcoders (circuit-tracer's method), pruned by influence, with the
    heads that carry each edge and its faithfulness by intervention on the prompt and the held-out prompts; shown on
    the app's Graph page."""
    from saelab.circuits.attribution_graph import GraphConfig
    from saelab.circuits.graph_faithfulness import GRANULARITIES, GraphCheckConfig
    from saelab.circuits.graph_file import GraphFile, graph_run

    if granularity not in GRANULARITIES:
        raise ConfigError(f"--granularity is one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    cfg = GraphConfig(max_feature_nodes=max_feature_nodes, memory_budget_mb=budget_mb)
    check = GraphCheckConfig(granularity=granularity)
    path = graph_run(run, prompt, model=model, name=name, variant=variant, cfg=cfg, held_out=held_out, check=check)
    found = GraphFile.load(path)
    typer.echo(
        f"wrote {path}: {len(found.nodes)} nodes, {len(found.edges)} edges kept; "
        f"replacement {found.replacement:.3f}, completeness {found.completeness:.3f}"
    )
    checked = found.faithfulness
    assert checked is not None  # graph_run measures it
    for where, spread in (("on the prompt", checked.found_on), (f"on {len(held_out)} held-out", checked.held_out)):
        if spread is not None:
            low, high = spread["faithfulness_ci"][0]
            typer.echo(
                f"faithfulness {where}: {spread['faithfulness'][0]:.3f} [{low:.3f}, {high:.3f}], "
                f"completeness {spread['completeness'][0]:.3f}, {spread['n'][0]} nodes"
            )


@command("bench-synth")
def bench_synth_cmd(
    arch: str = typer.Option("topk", "--arch", help="Architectures to score, comma-separated (topk, relu, ...)."),
    width: str = typer.Option("1.0", "--width", help="Widths in latents per true feature, comma-separated."),
    k: int = typer.Option(4, "--k", help="Active latents per row (TopK kinds)."),
    steps: int = typer.Option(400, "--steps", help="Training steps per SAE (0: score the random initialisation)."),
    lr: float = typer.Option(3e-3, "--lr", help="Adam's learning rate."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Seeds, comma-separated."),
    generators: Optional[str] = typer.Option(None, "--generators", help="Generators, comma-separated (default all)."),
    hedging_steps: int = typer.Option(
        0, "--hedging-steps", help="Also measure hedging on the correlated pairs, with this many steps (0: not)."
    ),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every row's scores here as JSON."),
    figure: Optional[Path] = typer.Option(None, "--figure", help="Write the figure here (.html, else plotly JSON)."),
) -> None:
    """Score SAE architectures and widths on the fixed synthetic suite with known features (SynthSAEBench's MCC,
    uniqueness and F1, recovery at cosine thresholds, absorption on the hierarchy, hedging with --hedging-steps): one
    table, one figure."""
    from saelab.evals.synth_bench import bench_synth, setting_grid, write_bench

    def split(text: str) -> list[str]:
        return [part.strip() for part in text.split(",") if part.strip()]

    try:
        widths, seed_list = [float(w) for w in split(width)], [int(s) for s in split(seeds)]
    except ValueError as err:
        raise ConfigError(f"--width takes numbers and --seeds integers, comma-separated: {err}") from None
    bench = bench_synth(
        setting_grid(split(arch), widths, k=k, steps=steps, lr=lr),
        seeds=seed_list,
        generators=None if generators is None else split(generators),
        hedging_steps=hedging_steps,
        progress=lambda line: typer.echo(line, err=True),
    )
    typer.echo(bench.table())
    for path in write_bench(bench, json_path=json_path, figure_path=figure):
        typer.echo(f"wrote {path}")


@command("finetune-minilm")
def finetune_minilm_cmd(
    out: Path = typer.Argument(..., help="A new folder for the fine-tuned copy (load it as `model: OUT`)."),
    package: str = typer.Option("asyncio", "--package", help="The embedded corpus's package to fine-tune on."),
    layer: int = typer.Option(3, "--layer", help="The encoder layer whose MLP trains."),
    objective: str = typer.Option(
        "topic",
        "--objective",
        help="topic: a frozen random readout of the MLP's output must tell the package's tokens from the rest (a "
        "new, known direction); mlm: masked-LM on the package's docstrings.",
    ),
    steps: int | None = typer.Option(None, "--steps", help="Steps of the MLP (default: the objective's)."),
    neurons: int | None = typer.Option(
        None, "--neurons", help="topic: MLP neurons dedicated to the new feature (default 16; 0: the whole MLP trains)."
    ),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Fine-tune one MLP of a copy of MiniLM on one package's docstrings (a few minutes on two cores), for an
    offline model diff: harvest it beside the original (`models: {base: minilm, tuned: OUT}`), train a crosscoder
    on both and run `saelab diff RUN --tuned-on PACKAGE`."""
    import time

    from saelab.toys.finetune import finetune_minilm

    if objective not in ("topic", "mlm"):
        raise ConfigError(f"--objective {objective!r} is not one of topic, mlm")
    start = time.perf_counter()
    finetune_minilm(out, documents=package, layer=layer, objective=objective, steps=steps, neurons=neurons, seed=seed)
    typer.echo(
        f"fine-tuned layer {layer}'s MLP on {package!r} ({objective}) in {time.perf_counter() - start:.0f}s; "
        f"wrote {out}"
    )


@command()
def quickstart(
    out: str = typer.Option("runs/quickstart", "--out", help="Run directory."),
    port: int = typer.Option(8050, "--port", help="Port of the app."),
    host: Host = "127.0.0.1",
    allow_remote: AllowRemote = False,
    no_serve: bool = typer.Option(False, "--no-serve", help="Stop after the analysis."),
    tokens: int = typer.Option(1_000_000, "--tokens", help="Training tokens per SAE."),
) -> None:
    """Harvest MiniLM over the embedded corpus, train TopK SAEs on one layer, analyse them, then serve the app."""
    from saelab.dashboards.wsgi import check_host
    from saelab.quickstart import quickstart as run_quickstart

    warning = None if no_serve else check_host(host, port, allow_remote=allow_remote)  # before hours of work
    seconds = run_quickstart(out, train_tokens=tokens)
    typer.echo("quickstart: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()) + f"; run directory {out}")
    if not no_serve:
        from saelab.dashboards.app import serve as run_app

        if warning:
            typer.secho(warning, fg=typer.colors.YELLOW, err=True)
        typer.echo(f"serving http://{host}:{port}/ (Ctrl-C to stop)")
        run_app(out, host=host, port=port)


if __name__ == "__main__":
    app()
