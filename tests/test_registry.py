from typing import Literal

import pytest

from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import MODELS, REGISTRIES, Registry
from cnnlab.core.validation import PositiveFloat


def make_registry() -> Registry:
    reg = Registry("widget", "widgets", context=("size",))

    @reg.register(family="round")
    def wheel(*, size: int, spokes: int = 8, color: Literal["red", "blue"] = "red") -> dict:
        """A wheel."""
        return {"size": size, "spokes": spokes, "color": color}

    @reg.register
    def wedge(*, angle: PositiveFloat = 30.0) -> dict:
        return {"angle": angle}

    @reg.register(name="wheel_large")
    def _large(*, size: int) -> dict:
        return {"size": size * 2}

    return reg


def test_register_lookup_and_build_pass_options_and_context():
    reg = make_registry()
    assert reg.get("wheel").family == "round"
    assert reg.get("wheel").description == "A wheel."
    assert reg.build("wheel", {"spokes": 12}, prefix="w", size=3) == {"size": 3, "spokes": 12, "color": "red"}
    assert reg.build("wheel_large", {}, prefix="w", size=3) == {"size": 6}
    assert "wedge" in reg and len(reg) == 3


def test_listing_uses_shell_wildcards_and_is_sorted():
    reg = make_registry()
    assert reg.names() == ["wedge", "wheel", "wheel_large"]
    assert reg.names("whe*") == ["wheel", "wheel_large"]
    assert reg.names("w?dge") == ["wedge"]
    assert reg.names("nothing*") == []


def test_duplicate_names_are_rejected():
    reg = make_registry()
    with pytest.raises(ValueError, match="already registered"):
        reg.register(name="wheel")(lambda: None)


def test_unknown_name_names_kind_close_matches_and_list_command():
    reg = make_registry()
    with pytest.raises(CnnlabError) as e:
        reg.get("wheeel")
    msg = str(e.value)
    assert "unknown widget 'wheeel'" in msg and "did you mean: wheel" in msg and "cnnlab list widgets" in msg
    assert "\n" not in msg


def test_unknown_keyword_names_close_matches_and_accepted_keywords():
    reg = make_registry()
    with pytest.raises(CnnlabError) as e:
        reg.build("wheel", {"spoke": 3}, prefix="widget", size=1)
    msg = str(e.value)
    assert "has no option 'spoke'" in msg and "did you mean: spokes" in msg and "it takes: spokes, color" in msg


def test_context_keys_cannot_be_set_by_the_user():
    reg = make_registry()
    with pytest.raises(CnnlabError, match=r"widget.size is set by cnnlab itself"):
        reg.check_options("wheel", {"size": 4}, prefix="widget")


def test_option_values_are_type_and_range_checked_with_the_key_named():
    reg = make_registry()
    with pytest.raises(CnnlabError, match=r"widget.spokes must be an integer, got 'many'"):
        reg.check_options("wheel", {"spokes": "many"}, prefix="widget")
    with pytest.raises(CnnlabError, match=r"widget.angle must be a number > 0, got -5"):
        reg.check_options("wedge", {"angle": -5}, prefix="widget")
    with pytest.raises(CnnlabError, match=r"widget.color must be one of red, blue, got 'green'"):
        reg.check_options("wheel", {"color": "green"}, prefix="widget")
    assert reg.check_options("wedge", {"angle": 2}, prefix="widget") == {"angle": 2.0}  # int -> float


def test_builders_must_annotate_every_option():
    reg = Registry("widget", "widgets")
    with pytest.raises(TypeError, match="needs a type annotation"):
        @reg.register
        def bad(*, x=1):
            return x


def test_every_kind_has_a_registry_with_entries():
    assert set(REGISTRIES) == {"datasets", "models", "optimizers", "schedulers", "inits", "augments", "tasks",
                               "samplers", "pruners"}
    for registry in REGISTRIES.values():
        assert len(registry) >= 2, registry.plural
    assert {"mlp", "lenet5", "small_resnet"} <= set(MODELS.names())
