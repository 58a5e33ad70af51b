"""Serving pieces that the HTTP tests do not reach: settings, URIs, recorded metadata, softmax, RGB images."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from serving.errors import BatchSizeError, InputError, ModelLoadError, ModelSourceError, SettingsError
from serving.inputs import check_batch_size, from_float32_bytes, from_nested, from_pngs
from serving.model_size import model_bytes
from serving.model_source import RegistryRef, _onnx_file, _read_card, parse_registry_uri
from serving.runtime import recorded_metadata, softmax
from serving.settings import DEFAULT_MODEL_URI, Settings, load_settings


def test_settings_come_from_the_environment_and_flags_win():
    env = {"BALLOT_MODEL_URI": "/m.onnx", "BALLOT_PORT": "9001", "BALLOT_THREADS": "2", "MLFLOW_TRACKING_URI": "x"}
    settings = load_settings(env, {"port": 9002, "max_batch": None})
    assert (settings.model_uri, settings.port, settings.threads, settings.tracking_uri) == ("/m.onnx", 9002, 2, "x")
    assert settings.max_batch == Settings().max_batch
    assert load_settings({"BALLOT_READ_TIMEOUT": "2.5"}).read_timeout == 2.5
    assert load_settings({}).access_log is False
    assert load_settings({"BALLOT_ACCESS_LOG": "True"}).access_log is True
    assert load_settings({"BALLOT_ACCESS_LOG": "0"}).access_log is False
    assert load_settings({}).model_uri == DEFAULT_MODEL_URI == "models:/ballot-fashion-mnist@champion"


@pytest.mark.parametrize("env, message", [
    ({"BALLOT_PORT": "eighty"}, "port (BALLOT_PORT): expected an integer"),
    ({"BALLOT_PORT": "0"}, "port (BALLOT_PORT): must be in 1..65535"),
    ({"BALLOT_MAX_BATCH": "0"}, "max_batch (BALLOT_MAX_BATCH)"),
    ({"BALLOT_THREADS": "-1"}, "threads (BALLOT_THREADS)"),
    ({"BALLOT_DEVICE": "tpu"}, "device (BALLOT_DEVICE)"),
    ({"BALLOT_MAX_BODY_BYTES": "10"}, "max_body_bytes (BALLOT_MAX_BODY_BYTES)"),
    ({"BALLOT_LOG_LEVEL": "loud"}, "log_level (BALLOT_LOG_LEVEL)"),
    ({"BALLOT_READ_TIMEOUT": "soon"}, "read_timeout (BALLOT_READ_TIMEOUT): expected a number of seconds"),
    ({"BALLOT_READ_TIMEOUT": "0"}, "read_timeout (BALLOT_READ_TIMEOUT): must be in (0, 3600]"),
    ({"BALLOT_MAX_CONNECTIONS": "0"}, "max_connections (BALLOT_MAX_CONNECTIONS): must be >= 1"),
    ({"BALLOT_ACCESS_LOG": "maybe"}, "access_log (BALLOT_ACCESS_LOG): expected true or false"),
])
def test_bad_settings_name_their_variable(env, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(env)


def test_unknown_override_is_rejected():
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings({}, {"portt": 1})


@pytest.mark.parametrize("uri, ref", [
    ("models:/ballot-fashion-mnist@champion", RegistryRef("ballot-fashion-mnist", alias="champion")),
    ("models:/m/12", RegistryRef("m", version="12")),
])
def test_registry_uris_parse(uri, ref):
    assert parse_registry_uri(uri) == ref


@pytest.mark.parametrize("uri", ["models:/", "models:/m", "models:/m@", "models:/@a", "models:/m/latest",
                                 "models:/a/b/3", "runs:/abc/model"])
def test_malformed_registry_uris_are_rejected(uri):
    with pytest.raises(ModelSourceError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
        parse_registry_uri(uri)


def test_registry_tags_override_onnx_metadata_and_are_decoded_by_type():
    onnx_props = {"acc": "0.5", "dataset": '"digits"', "class_names": '["a", "b"]', "input_shape": "[1, 2, 2]"}
    tags = {"acc": "0.75", "dataset": "fashion-mnist", "class_names": '["x", "y"]', "unrelated": "kept out"}
    meta = recorded_metadata(onnx_props, tags)
    assert meta == {"acc": 0.75, "dataset": "fashion-mnist", "class_names": ["x", "y"], "input_shape": [1, 2, 2]}


def test_optional_text_keys_are_read_from_either_source_and_absent_ones_are_left_out():
    assert recorded_metadata({"granularity": '"unit"', "onnx_format": '"compact"'}, {}) == {
        "granularity": "unit", "onnx_format": "compact"}
    assert recorded_metadata({"granularity": '"unit"'}, {"granularity": "weight", "onnx_format": "dense"}) == {
        "granularity": "weight", "onnx_format": "dense"}
    assert recorded_metadata({"acc": "0.5"}, {}) == {"acc": 0.5}


def test_model_bytes_count_the_external_data_files_a_model_names(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weights = [numpy_helper.from_array(np.full((64, 64), i, dtype=np.float32), f"w{i}") for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y"])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])], weights))
    inline = tmp_path / "inline.onnx"
    onnx.save_model(model, str(inline))
    assert model_bytes(inline) == inline.stat().st_size > 2 * 64 * 64 * 4
    (tmp_path / "split").mkdir()
    split = tmp_path / "split" / "model.onnx"
    onnx.save_model(model, str(split), save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "split" / "unrelated.bin").write_bytes(bytes(10_000))
    data = (tmp_path / "split" / "weights.bin").stat().st_size
    assert data >= 2 * 64 * 64 * 4 and split.stat().st_size < 1000
    assert model_bytes(split) == split.stat().st_size + data


@pytest.mark.parametrize("props, message", [
    ({"acc": "high"}, "'acc' is not valid JSON"),
    ({"cwv": '"0.1"'}, "'cwv' must be a number"),
    ({"class_names": '"abc"'}, "'class_names' must be a JSON list"),
    ({"method": "3"}, "'method' must be a string"),
    ({"granularity": '["unit"]'}, "'granularity' must be a string"),
])
def test_malformed_recorded_metadata_stops_loading(props, message):
    with pytest.raises(ModelLoadError, match=message):
        recorded_metadata(props, {})


def test_undefined_recorded_metrics_are_reported_as_unknown():
    assert recorded_metadata({"cwv": "NaN"}, {"mcd": "Infinity"}) == {"cwv": None, "mcd": None}


def test_softmax_is_a_distribution_even_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    probabilities = softmax(logits)
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    np.testing.assert_allclose(probabilities[1], 1 / 3)
    assert probabilities[0].argmax() == 0


def test_batch_size_limits():
    check_batch_size(4, 4)
    with pytest.raises(InputError, match="empty batch"):
        check_batch_size(0, 4)
    with pytest.raises(BatchSizeError, match="5 items exceeds the limit of 4"):
        check_batch_size(5, 4)


def test_flat_and_nested_items_give_the_same_batch():
    values = np.random.default_rng(0).random((3, 2, 2, 2))
    nested = from_nested(values.tolist(), (2, 2, 2))
    flat = from_nested(values.reshape(3, -1).tolist(), (2, 2, 2))
    assert nested.dtype == np.float32 and nested.shape == (3, 2, 2, 2)
    np.testing.assert_array_equal(nested, flat)


def test_tabular_models_take_any_finite_values_but_images_take_pixels():
    assert from_nested([[-5.0, 300.0]], (2,)).tolist() == [[-5.0, 300.0]]
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        from_nested([[[[-5.0]]]], (1, 1, 1))


@pytest.mark.parametrize("shape, bad, message", [
    ((4, 1, 2, 2), (2, 0, 1, 1, float("nan")), "item 2 holds NaN"),
    ((4, 1, 2, 2), (3, 0, 0, 0, float("-inf")), "item 3 holds NaN or an infinite value"),
    ((4, 3), (1, 2, float("inf")), "item 1 holds NaN or an infinite value"),
    ((4, 1, 2, 2), (0, 0, 0, 1, 1.5), r"pixels scaled to \[0, 1\]; got values in \[0.0\d+, 1.5\]"),
])
def test_raw_bytes_are_viewed_in_place_and_checked(shape, bad, message):
    batch = np.random.default_rng(0).random(shape, dtype=np.float32)
    body = bytearray(b"header" + batch.tobytes())
    viewed = from_float32_bytes(memoryview(body)[6:], shape)
    np.testing.assert_array_equal(viewed, batch)
    body[6:10] = np.float32(0.25).tobytes()
    assert viewed.flat[0] == 0.25  # a view of the body, not a copy
    batch[bad[:-1]] = bad[-1]
    with pytest.raises(InputError, match=message):
        from_float32_bytes(batch.tobytes(), shape)


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_pngs_are_converted_to_the_models_channel_count():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    rgb = np.stack([gray, gray // 2, gray // 4], axis=-1)
    as_rgb = from_pngs([_png(gray), "data:image/png;base64," + _png(rgb)], (3, 3, 4))
    assert as_rgb.shape == (2, 3, 3, 4) and as_rgb.dtype == np.float32
    for channel in range(3):  # a grayscale PNG fills all three channels with its gray value
        np.testing.assert_allclose(as_rgb[0, channel], gray / 255.0)
    np.testing.assert_allclose(as_rgb[1, 1], (gray // 2) / 255.0)
    as_gray = from_pngs([_png(gray)], (1, 3, 4))
    np.testing.assert_allclose(as_gray[0, 0], gray / 255.0)


def test_models_without_image_inputs_refuse_images():
    with pytest.raises(InputError, match="not images"):
        from_pngs([_png(np.zeros((2, 2), np.uint8))], (4,))


def test_validation_messages_are_one_readable_line():
    from serving.responses import describe_validation

    errors = [{"type": "list_type", "loc": ("body", "inputs", 3), "msg": "Input should be a valid list"}] * 2
    errors += [{"type": "string_type", "loc": ("body", "images", i), "msg": "bad"} for i in range(6)]
    text = describe_validation(errors)
    assert text.startswith("inputs[3]: Input should be a valid list; images[0]: bad")
    assert text.endswith("(and 2 more)") and "\n" not in text


def test_a_broken_mlmodel_or_an_unreadable_card_is_a_one_line_source_error(tmp_path):
    ref = RegistryRef("m", alias="champion")
    mlmodel = tmp_path / "MLmodel"
    for text, problem in (("flavors: [unclosed", "cannot be read as YAML"), ("- a list", "not a YAML mapping")):
        mlmodel.write_text(text)
        with pytest.raises(ModelSourceError, match=problem) as error:
            _onnx_file(tmp_path, ref)
        assert "registered model 'm' (alias 'champion')" in str(error.value) and "\n" not in str(error.value)
    unreadable = tmp_path / "model_card.md"
    unreadable.mkdir()  # reading it fails with an OSError, as a card the service user may not read does
    with pytest.raises(ModelSourceError, match="model card .* cannot be read"):
        _read_card(unreadable)


def test_gunzip_reads_members_across_its_slices_and_names_what_is_wrong():
    import gzip
    import os
    import zlib

    from serving.limits import GUNZIP_SLICE, MAX_GZIP_MEMBERS, TooLarge, gunzip

    noise = os.urandom(3 * GUNZIP_SLICE + 7)  # incompressible: one member spans four slices
    members = gzip.compress(noise) + gzip.compress(b"") * (MAX_GZIP_MEMBERS - 2) + gzip.compress(b"end")
    assert gunzip(members, len(noise) + 3) == noise + b"end"
    with pytest.raises(zlib.error, match=f"more than {MAX_GZIP_MEMBERS} gzip members"):
        gunzip(members + gzip.compress(b""), len(noise) + 3)
    with pytest.raises(TooLarge):
        gunzip(members, len(noise) + 2)
    with pytest.raises(zlib.error, match="truncated stream"):
        gunzip(gzip.compress(noise)[:-GUNZIP_SLICE], len(noise))
    with pytest.raises(zlib.error, match=r"^4 bytes follow the stream and are not another gzip member"):
        gunzip(gzip.compress(noise) + b"tail", len(noise))
