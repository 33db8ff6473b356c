"""Every flow takes the one typed config with the built-in defaults: a frozen instance that no run can
change for the next, which Prefect still renders as the config form (every section, every default)."""
import pydantic
import pytest

from flows.stages import DEFAULTS, FLOWS
from storage.config import TFConfig


def test_the_default_config_cannot_be_changed_by_a_run():
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        DEFAULTS.generator.steps = 1
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        DEFAULTS.generator = DEFAULTS.generator
    assert DEFAULTS == TFConfig()


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_prefect_renders_the_config_form_with_every_setting_and_its_default(name):
    schema = FLOWS[name].parameters.model_dump()
    config = schema["properties"]["config"]
    assert config["$ref"] == "#/definitions/TFConfig" and config["default"] == TFConfig().model_dump(mode="json")
    definitions = schema["definitions"]
    for section, info in TFConfig.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, pydantic.BaseModel):
            shown = definitions[info.annotation.__name__]["properties"]
            assert set(shown) == set(info.annotation.model_fields), section
    assert definitions["GeneratorConfig"]["properties"]["steps"]["minimum"] == 1   # constraints come along
