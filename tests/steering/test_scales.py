"""A latent's typical max activation (saelab.steering.scales)."""

from __future__ import annotations

import pytest

from saelab import steering as st
from tests.steering.helpers import HOOK, PROMPT


def test_typical_max_act_from_the_analysis_or_measured(dec_sae, decoder):
    x = st.hook_acts(decoder, st.prompt_tokens(decoder, PROMPT), HOOK)[0]
    f = dec_sae.encode(x).amax(0)
    live, dead = int(f.argmax()), int((f == 0).nonzero()[0])
    assert st.typical_max_act(dec_sae, live, acts=x) == (pytest.approx(float(f[live])), "measured")
    value, source = st.typical_max_act(dec_sae, dead, acts=x)
    assert value == pytest.approx(float(f[f > 0].median()), rel=0.05) and "never fired" in source
    assert st.typical_max_act(dec_sae, 3, max_act=f.numpy() * 0 + 7.0) == (7.0, "analysis")
