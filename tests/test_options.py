import pytest

from mpsearch.core import InvalidOptionError, parse_option, parse_options


def test_parse_grammar():
    o = parse_option("int4_g128_asym")
    assert (o.kind, o.bits, o.group_size, o.symmetric) == ("int", 4, 128, False)
    assert parse_option("int8").group_size is None and parse_option("int8").symmetric
    fp4 = parse_option("fp4_e2m1")
    assert (fp4.kind, fp4.bits, fp4.group_size, fp4.exponent_bits, fp4.mantissa_bits) == ("fp", 4, 32, 2, 1)
    assert parse_option("fp4_e2m1_g16").group_size == 16
    assert parse_option("fp8_e5m2").exponent_bits == 5
    assert parse_option("fp16").kind == "none"


@pytest.mark.parametrize(
    "bad", ["int1", "int9", "int4_g0", "int4g128", "fp8", "fp8_e3m4", "INT4", "", "int4_asym_g128"]
)
def test_bad_names_raise_with_the_grammar(bad):
    with pytest.raises(InvalidOptionError, match="unknown option") as err:
        parse_option(bad)
    assert "int4_g128_asym" in str(err.value)


def test_effective_bits_count_scales_and_zero_points():
    shape = (256, 512)
    assert parse_option("int4").effective_bits(shape) == pytest.approx(4 + 16 / 512)
    assert parse_option("int4_g128").effective_bits(shape) == pytest.approx(4 + 16 / 128)
    assert parse_option("int4_g128_asym").effective_bits(shape) == pytest.approx(4 + (16 + 4) / 128)
    assert parse_option("fp4_e2m1").effective_bits(shape) == pytest.approx(4 + 16 / 32)
    assert parse_option("fp8_e4m3").effective_bits(shape) == pytest.approx(8 + 16 / 512)
    assert parse_option("fp16").effective_bits(shape) == 16
    # conv weight: the row is in_channels * kh * kw; a partial last group still stores a scale
    assert parse_option("int4_g128").n_scales((8, 3, 10, 10)) == 8 * 3


def test_parse_options_rejects_duplicates_and_empty():
    with pytest.raises(InvalidOptionError, match="duplicate"):
        parse_options(["int4", "int4"])
    with pytest.raises(InvalidOptionError, match="no options"):
        parse_options([])
