"""Conformance suites derived from the registries of runtimes, quantizers and layer types (estimators and
solvers: tests/test_conformance.py, tests/test_solver_conformance.py): a new registration is checked without
anyone adding it to a list (mpsearch.testing)."""

import pytest
import torch

from mpsearch.core import BitPlan
from mpsearch.layers import _REGISTRY, find_units
from mpsearch.testing import (
    check_layer_type,
    check_quantizer,
    check_runtime,
    layer_examples,
    runtime_instances,
    tiny_transformers,
)

RUNTIMES = runtime_instances()
# runtimes whose own package is installed here must be compared with it (the test extra installs them)
MUST_COMPARE = {"llama.cpp", "torchao", "hqq"}


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda r: r.name)
def test_every_runtime_charges_the_bytes_it_stores_and_decodes_as_mpsearch_quantizes(runtime):
    compared = check_runtime(runtime)
    if runtime.name in MUST_COMPARE:
        assert compared == len(runtime.default_options)


def test_the_registry_holds_every_format_family():
    from mpsearch.names import TARGET_NAMES
    from mpsearch.runtimes import RUNTIMES as ALL

    assert tuple(ALL) == TARGET_NAMES and {r.name for r in RUNTIMES} == set(TARGET_NAMES) - {"json"}


@pytest.fixture(scope="module")
def llama():
    model, batches = tiny_transformers()["llama"]()
    return model, batches


QUANTIZERS = {
    "rtn": lambda model, data: __import__("mpsearch").RTN(),
    "gptq": lambda model, data: __import__("mpsearch").GPTQ(model, data, progress=False),
    "imatrix": lambda model, data: __import__("mpsearch.quant.imatrix").quant.imatrix.Imatrix(
        model, data, progress=False
    ),
}


def test_every_registered_quantizer_has_a_conformance_factory():
    from mpsearch.names import QUANTIZERS as NAMES

    assert set(QUANTIZERS) == set(NAMES)


@pytest.mark.parametrize("name", list(QUANTIZERS))
@pytest.mark.parametrize(
    "options", [("int3_g16", "int8"), ("gptq:int4_g16", "gptq:int8_g16"), ("q8_0", "q8_0"), ("q4_1", "iq4_nl")]
)
def test_every_quantizer_applies_what_was_measured_in_every_runtime_it_serves(name, options, llama):
    model, data = llama
    quantizer = QUANTIZERS[name](model, data)
    from mpsearch.core import parse_option

    if not all(quantizer.supports(parse_option(o)) for o in options):
        pytest.skip(f"{name} has no grid for {options} (refused in one line: tests/test_bad_inputs.py)")
    units = [u for u in find_units(model) if all(parse_option(o).fits(tuple(u.weight.shape)) for o in options)]
    assert len(units) > 2  # the runtime can store most of the model: a real mixed plan
    plan = BitPlan({u.name: options[i % 2] for i, u in enumerate(units)})
    check_quantizer(quantizer, model, data, plan)


@pytest.mark.parametrize("entry", list(_REGISTRY), ids=lambda e: e.module_type.__name__)
def test_every_registered_layer_type_owns_its_behaviour(entry):
    examples = layer_examples()
    assert entry.module_type in examples, f"add an example of {entry.module_type.__name__} to layer_examples()"
    check_layer_type(entry, examples[entry.module_type])


def test_conv1d_of_transformers_is_registered_once_transformers_is_imported():
    import transformers  # noqa: F401
    from transformers.pytorch_utils import Conv1D

    from mpsearch.layers import layer_type

    assert layer_type(Conv1D(4, 4)).transposed
    check_layer_type(layer_type(Conv1D(4, 4)), layer_examples()[Conv1D])
    assert torch.is_tensor(Conv1D(4, 4).weight)
