"""The contracts of metaug_fast/contract.py are named once per language: the C++ header (csrc/oucl_common.h)
and the Triton constants (metaug_fast.kernels._common) must give every name the value Python gives it."""
import re
from enum import IntEnum
from pathlib import Path

import pytest

from metaug_fast import contract

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "oucl_common.h"


def _key(name: str) -> str:
    """kPosShift, POS_SHIFT and InfoNCE/INFONCE compare equal."""
    return re.sub(r"^k(?=[A-Z])", "", name).replace("_", "").upper()


def _cpp_enum(name: str) -> dict:
    body = re.search(rf"enum {name} : int64_t \{{(.*?)\}};", HEADER.read_text(), re.S)
    assert body, f"enum {name} not found in {HEADER.name}"
    return {_key(k): int(v) for k, v in re.findall(r"(k\w+)\s*=\s*(\d+)", body.group(1))}


def _py(enum: type[IntEnum]) -> dict:
    return {_key(k): int(v) for k, v in enum.__members__.items()}


@pytest.mark.parametrize("cpp, py", [("FormId", contract.Form), ("SimilarityId", contract.Similarity),
                                     ("Stat", contract.Stat)])
def test_cpp_enums_equal_the_python_ones(cpp, py):
    assert _cpp_enum(cpp) == _py(py)


def test_the_hvp_forms_are_one_list():
    listed = re.search(r"#define METAUG_HVP_FORMS\(X\) (.*)", HEADER.read_text())
    assert listed, f"METAUG_HVP_FORMS not found in {HEADER.name}"
    forms = _cpp_enum("FormId")
    assert [forms[_key(k)] for k in re.findall(r"X\((k\w+)\)", listed.group(1))] == list(contract.HVP_FORMS)


def test_cpp_sizes_equal_the_python_ones():
    assert int(re.search(r"constexpr int64_t kStats = (\d+);", HEADER.read_text()).group(1)) == contract.N_STATS


def test_triton_constants_come_from_the_python_enums():
    pytest.importorskip("triton")
    from metaug_fast.kernels import _common as K

    for form in contract.Form:
        assert getattr(K, "INFONCE" if form.name == "INFONCE" else form.name).value == form
    assert [K.ST_0.value, K.ST_1.value, K.ST_2.value, K.ST_3.value, K.ST_VALID.value] == list(range(contract.N_STATS))
    assert K.N_STATS.value == contract.N_STATS and K.N_PARTS.value == contract.N_PARTS
    assert [p.value for p in (K.PT_0, K.PT_1, K.PT_2, K.PT_3, K.PT_4, K.PT_5)] == [
        contract.Part.POS_MAX, contract.Part.POS_SUM, contract.Part.NEG_MAX, contract.Part.NEG_SUM,
        contract.Part.NAN_POS, contract.Part.NAN_NEG]


def test_every_stats_slot_has_a_name_per_form():
    # Each form's four slots are named (aliases of the same positions), and VALID is shared.
    names = contract.Stat.__members__
    for form in (("POS_SHIFT", "POS_LOG_SUM", "NEG_SHIFT", "NEG_LOG_SUM"), ("NCE_SHIFT", "NCE_LOG_SUM",
                 "NCE_SIGMOID_SUM", "NCE_N_POS"), ("P_MIN", "N_MAX", "TIES_POS", "TIES_NEG")):
        assert {int(names[n]) for n in form + ("VALID",)} == set(range(contract.N_STATS)), form
    assert names["HINGE_ARG"] == 0


def test_loss_params_validate_and_pack():
    p = contract.LossParams("circle", 80, margin=0.3)
    assert p.op_args() == (contract.Form.CIRCLE, 80.0, 0.0, 0.0, 0.3, 0.0) and p.op_args().beta == 80.0
    with pytest.raises(ValueError, match="form must be one of"):
        contract.LossParams("nope")
    with pytest.raises(ValueError, match="beta must be > 0"):
        contract.LossParams(beta=0)
    with pytest.raises(TypeError, match="gamma_pos must be a real number"):
        contract.LossParams(gamma_pos="1")
    with pytest.raises(TypeError, match=r"score_all got unexpected arguments \['temperature'\]"):
        contract.LossParams.from_kwargs("score_all", dict(temperature=0.1))
    assert contract.LossParams.info_nce(0.5) == (contract.Form.INFONCE, 2.0, 0.0, 0.0, 0.0, 0.0)


ROOT = HEADER.parents[1]
# A per-row state slot read or written by a bare number: stats[:, 2], part[..., 4], st[3], s[0], state[1].
_BARE_SLOT = re.compile(r"\b(stats|merged|part|parts|st|state|s)\[\s*(?:[:.]+\s*,\s*)*\d+\s*\]")


def test_no_per_row_state_slot_is_a_bare_number():
    sources = [*ROOT.glob("metaug_fast/**/*.py"),
               *(p for ext in ("h", "cpp", "cu", "cuh", "inc") for p in ROOT.glob(f"csrc/**/*.{ext}"))]
    assert len(sources) > 30
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in sources
             for n, line in enumerate(p.read_text().splitlines(), 1) if _BARE_SLOT.search(line)]
    assert not found, "\n".join(found)


def test_the_bare_slot_pattern_finds_what_it_should():
    for line in ("x = stats[:, 4]", "st[3] = T(0);", "part[..., 2]", "const T v = s[0];"):
        assert _BARE_SLOT.search(line), line
    for line in ("stats[:, Stat.VALID]", "st[kValid] = v;", "s[k] = e;", "stats[i]"):
        assert not _BARE_SLOT.search(line), line


def test_the_test_grid_takes_every_form_and_unknown_forms_are_refused():
    # tests/helpers.FORMS is the contract grid's own list (kept independent of the library on purpose): a form
    # added to the library and not to the grid fails here instead of going untested. An id or name that is
    # not a form raises instead of running as another form (reference.py fell through to circle, the Triton
    # kernels to the weighted form).
    import torch

    from metaug_fast import reference

    from helpers import FORMS

    assert set(FORMS) == set(contract.OUCL_FORMS)
    with pytest.raises(ValueError, match="form must be one of"):
        reference.exponents(torch.zeros(2, 3), torch.zeros(2, 3), "circles", 8.0, 0.1, -0.1, 0.3)
