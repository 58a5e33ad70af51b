"""The model-card contract: the export writes, the registry tags and the service reads the same keys.

The serving side imports no training code, so it states the keys itself; this test is what keeps the three lists
one contract."""

from __future__ import annotations

import json

import pytest

from ballot.errors import StorageError
from ballot.export import model_card
from ballot.tracking import OPTIONAL_TAG_KEYS, VERSION_TAG_KEYS, tag_value, version_tags
from serving.runtime import LIST_KEYS, NUMBER_KEYS, OPTIONAL_TEXT_KEYS, TEXT_KEYS, recorded_metadata
from serving.schemas import ModelCard
from tests.conftest import tiny_config

METRICS = {"density": 0.05, "acc": 0.9, "cwv": 0.001, "mcd": 0.2, "worst_class": 0.8, "dense": {"acc": 0.95}}


def test_the_export_card_holds_exactly_the_registry_keys():
    card = model_card(METRICS, tiny_config(), ["a", "b"], [1, 8, 8])
    assert set(card) == set(VERSION_TAG_KEYS) | set(OPTIONAL_TAG_KEYS)


def test_the_service_reads_every_registry_key_and_reports_it():
    assert set(NUMBER_KEYS + TEXT_KEYS + LIST_KEYS) == set(VERSION_TAG_KEYS)
    assert set(VERSION_TAG_KEYS) <= set(ModelCard.model_fields)


def test_the_services_optional_keys_are_reported_and_null_when_not_recorded():
    """granularity, onnx_format and quantization: read when the export or the registry records them (newer exports
    do)."""
    assert set(OPTIONAL_TEXT_KEYS) == {"granularity", "onnx_format", "quantization"} and set(OPTIONAL_TEXT_KEYS) <= set(
        ModelCard.model_fields)
    assert not set(OPTIONAL_TEXT_KEYS) & set(VERSION_TAG_KEYS)  # not required of a registered version (yet)
    recorded = {"granularity": "unit", "onnx_format": "compact", "quantization": "static"}
    for props, registry in (({key: json.dumps(value) for key, value in recorded.items()}, {}), ({}, recorded)):
        assert recorded_metadata(props, registry) == recorded
    unrecorded = ModelCard(name="m", version=None, alias=None, uri="m.onnx", input_shape=(1,), class_names=("a",),
                           providers=(), file_bytes=1)
    assert all(getattr(unrecorded, key) is None for key in OPTIONAL_TEXT_KEYS)


def test_a_card_survives_export_registry_and_service_unchanged():
    card = model_card(METRICS, tiny_config(), ["a", "b"], [1, 8, 8])
    onnx_props = {key: json.dumps(value) for key, value in card.items()}  # how export_onnx writes metadata_props
    tags = {key: tag_value(value) for key, value in version_tags(card, "model.onnx").items()}
    for props, registry in ((onnx_props, {}), ({}, tags)):
        served = recorded_metadata(props, registry)
        assert served == {key: card[key] for key in VERSION_TAG_KEYS}


def test_metrics_without_a_card_key_are_named():
    with pytest.raises(StorageError, match=r"the metrics lack \['cwv'\]"):
        model_card({k: v for k, v in METRICS.items() if k != "cwv"}, tiny_config(), ["a", "b"], [1, 8, 8])
