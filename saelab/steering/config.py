"""`SteerConfig`: what `saelab steer` runs. Values are checked where they are declared; the run, the SAE folder and
the model are looked for by `run_steering`, not here, so a config can be built and checked anywhere."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, NonNegativeInt

from saelab.config import StrictModel, TextConfig
from saelab.steering.interventions import MAX_COEFFICIENT, Mode

Coefficient = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_COEFFICIENT, le=MAX_COEFFICIENT)]


class SteerConfig(StrictModel):
    """What `saelab steer` runs: one latent of the SAE in folder `sae` steered in the run's model (or `model`) at
    each of `coefficients` (in units of `scale`, default the latent's typical max activation; |coefficient| at most
    `MAX_COEFFICIENT`), written to the run's steering result `name`. Decoders continue `prompts` (each with room
    for `max_new_tokens` in the model's context); encoders search the first `corpus_documents` documents of
    `corpus` for each of `queries`."""

    name: str = Field(default="steer", pattern=r"^[\w.-]+$", max_length=200)
    run: str
    model: str | None = None
    sae: str
    latent: int = Field(ge=0)
    mode: Mode = "add"
    coefficients: list[Coefficient] = Field(default=[0.0, 1.0, 2.0, 4.0], min_length=1)
    scope: Union[Literal["prompt", "generated", "all"], list[NonNegativeInt]] = "all"
    scale: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    prompts: list[str] = []
    max_new_tokens: int = Field(default=20, ge=1)
    temperature: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    seed: int = 0
    queries: list[str] = []
    corpus: TextConfig = TextConfig()
    corpus_documents: int = Field(default=500, ge=1)
    k: int = Field(default=10, ge=1)
    device: str = "auto"
