"""White-box attacks on ONNX files: onnx-ad gradients (torch fallback) against the source frameworks, the
finite-difference self-check, the asymmetric-padding rewrite, and UAPs equal to those crafted on the source."""
import numpy as np
import pytest

from auditkit.errors import AuditkitError
from auditkit.models import ModelSpec, load_model
from auditkit.models import onnx_grad
from auditkit.uap.base import SGDSettings
from auditkit.uap.geometry import xi_for
from auditkit.uap.paper import PaperUAP
from auditkit.uap.sgd import SGDUAP

from conftest import attack_settings

SIZE = 32
CLASSES = ["normal", "pneumonia", "COVID-19"]


def region_images(n, seed):
    """Noisy frames where each class brightens its own region: a CNN learns them in a few epochs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    regions = np.stack([xx < 12, xx > 20, (yy - 20) ** 2 + (xx - 16) ** 2 < 30]).astype(np.float32)
    labels = np.arange(n) % 3
    x = rng.normal(0.45, 0.1, (n, SIZE, SIZE)) + 0.06 * regions[labels] * rng.uniform(0.6, 1.2, (n, 1, 1))
    return np.clip(x, 0, 1).astype(np.float32), labels


def per_sample_error(g, reference):
    diff = np.linalg.norm((g - reference).reshape(len(g), -1), axis=1)
    return diff / np.linalg.norm(reference.reshape(len(g), -1), axis=1)


def onehot(labels):
    return np.eye(3, dtype=np.float32)[labels]


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A trained Keras CNN (stride-2 'same' conv, i.e. asymmetric ONNX pads; depthwise; residual add; concat;
    3 channels with scale/mean/std) and its tf2onnx export, both behind auditkit adapters, plus images."""
    import keras
    import tensorflow as tf
    import tf2onnx

    from auditkit.models.base import model_input

    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    x = keras.layers.Add()([x, keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)])
    x = keras.layers.Concatenate()([x, keras.layers.Conv2D(4, 1, activation="relu")(x)])
    x = keras.layers.Flatten()(keras.layers.MaxPooling2D(2)(x))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x))
    images, labels = region_images(150, 1)
    spec = ModelSpec(channels=3, scale=255.0, mean=(120.0,), std=(60.0,))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(model_input(images, spec, np), labels, epochs=6, batch_size=16, verbose=0)
    d = tmp_path_factory.mktemp("twins")
    (d / "cnn.yaml").write_text(f"classes: {CLASSES}\nscale: 255.0\nmean: [120.0]\nstd: [60.0]\n")
    model.save(d / "cnn.keras")
    sig = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=sig, opset=17, output_path=str(d / "cnn.onnx"))
    return load_model(d / "cnn.keras"), load_model(d / "cnn.onnx"), region_images(40, 2)[0]


@pytest.mark.slow
def test_tf2onnx_gradients_match_keras_and_pass_the_self_check(twins):
    keras_model, onnx_model, images = twins
    assert onnx_model.spec.layout == "NHWC" and onnx_model.spec.channels == 3
    assert onnx_model.can_craft and onnx_model.craft_refusal == ""
    path = onnx_model.gradient_path
    assert path.name == "onnx-ad" and path.error <= onnx_grad.MAX_REL_ERROR
    labels = np.array([0, 1, 2, 1, 0, 2, 2, 1])
    x = images[: len(labels)]
    g = onnx_model.loss_gradient(x, labels)
    reference = keras_model.loss_gradient(x, labels)
    errors = per_sample_error(g, reference)
    print(f"\ntf2onnx CNN: onnx-ad vs GradientTape relative error median {np.median(errors):.1e} "
          f"max {errors.max():.1e}; self-check {path.error:.1e}")
    assert np.median(errors) <= 1e-4
    np.testing.assert_allclose(np.exp(onnx_model.log_probs(images)), keras_model.predict_proba(images), atol=1e-5)


@pytest.mark.slow
def test_asymmetric_padding_is_rewritten_and_the_rewrite_is_needed(twins):
    import onnx
    import onnx_ad

    keras_model, onnx_model, images = twins
    wrapped = onnx_grad.image_space_model(onnx.load(onnx_model.path), onnx_model.input_name, onnx_model.spec)
    fixed = onnx_grad.with_batch(wrapped, 4)

    def conv_pads(model):
        return [list(a.ints) for n in model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads"]

    assert [0, 0, 1, 1] in conv_pads(fixed)  # TF 'SAME', stride 2, even size: pad only after
    rewritten = onnx_grad.explicit_pads(fixed)
    assert all(p[: len(p) // 2] == p[len(p) // 2 :] for p in conv_pads(rewritten))
    assert "Pad" in {n.op_type for n in rewritten.graph.node}

    labels = np.array([0, 1, 2, 0])
    reference = keras_model.loss_gradient(images[:4], labels)
    raw = onnx_grad.session(onnx_ad.reverse(fixed, inputs=[onnx_grad.IMAGE], outputs=[onnx_grad.LOSS],
                                            prefix="adj_", dim="nadj", layout="onnx"))

    def unrewritten(x, oh):
        feed = {onnx_grad.IMAGE: x, onnx_grad.ONEHOT: oh, "adj_" + onnx_grad.LOSS: np.ones((4, 1), np.float32)}
        return None, raw.run([onnx_grad.ADJ_IMAGE], feed)[0][..., 0]

    wrong = unrewritten(images[:4], onehot(labels))[1]
    assert np.median(per_sample_error(wrong, reference)) > 0.3  # onnx-ad alone is silently wrong here

    forward = onnx_grad.session(wrapped)

    def losses(x, oh):
        return forward.run([onnx_grad.LOSS], {onnx_grad.IMAGE: x, onnx_grad.ONEHOT: oh})[0]

    rng = np.random.default_rng(0)
    assert np.median(onnx_grad.relative_errors(unrewritten, losses, images[:4], labels, 3, rng)) > 0.3
    assert np.median(onnx_grad.relative_errors(onnx_model.gradient_path.gradient, losses, images[:4], labels, 3,
                                               rng)) < onnx_grad.MAX_REL_ERROR


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("inf", 0.01), ("2", 0.2)])
@pytest.mark.parametrize("target", [None, 2])
def test_uap_crafted_on_onnx_equals_uap_crafted_on_keras(twins, norm, eps, target):
    keras_model, onnx_model, images = twins
    xi, _ = xi_for(images, norm, 0.08)
    attack = PaperUAP(attack_settings(norm, None if target is None else CLASSES[target], zeta=0.08, eps=eps,
                                      max_iter=3))
    k = attack.craft(keras_model, images, xi, np.random.default_rng(7))
    o = attack.craft(onnx_model, images, xi, np.random.default_rng(7))
    assert np.abs(k.rho).max() > 0 and k.steps > 0, "the attack moved nothing: the comparison would be vacuous"
    assert (k.rates, k.steps, k.passes) == (o.rates, o.steps, o.passes)
    np.testing.assert_allclose(o.rho, k.rho, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_sgd_uap_on_onnx_equals_keras(twins, norm):
    keras_model, onnx_model, images = twins
    xi, _ = xi_for(images, norm, 0.08)
    attack = SGDUAP(attack_settings(norm, zeta=0.08, algorithm="sgd", max_iter=3, sgd=SGDSettings(batch_size=16)))
    k = attack.craft(keras_model, images, xi, np.random.default_rng(3))
    o = attack.craft(onnx_model, images, xi, np.random.default_rng(3))
    assert np.abs(k.rho).max() > 0
    # the frameworks sum gradients in different orders, so a near-zero momentum component can get the other sign
    assert np.isclose(o.rho, k.rho, atol=1e-6).mean() >= 0.99
    np.testing.assert_allclose(k.rates, o.rates, atol=1.5 / len(images))


def torch_net():
    torch = pytest.importorskip("torch")
    from torch_net import small_torch_net

    return torch, small_torch_net(32)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export's own deprecation chatter
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_pytorch_exports_match_autograd(tmp_path, exporter):
    torch, net = torch_net()
    if exporter == "dynamo":
        pytest.importorskip("onnxscript", reason="torch's default (dynamo) ONNX exporter needs onnxscript")
        kwargs = {"dynamic_shapes": {"x": {0: torch.export.Dim("batch")}}, "external_data": False}
    else:
        kwargs = {"dynamo": False, "dynamic_axes": {"x": {0: "batch"}}, "opset_version": 17}
    path = tmp_path / f"{exporter}.onnx"
    torch.onnx.export(net, (torch.rand(2, 1, SIZE, SIZE),), str(path), input_names=["x"], **kwargs)
    (tmp_path / f"{exporter}.yaml").write_text(f"classes: {CLASSES}\nscale: 2.0\nmean: [0.5]\nstd: [0.25]\n")
    model = load_model(path)
    assert (model.spec.layout, model.spec.channels, model.spec.output) == ("NCHW", 1, "logits")
    assert model.can_craft and model.gradient_path.name == "onnx-ad"

    images, labels = region_images(6, 3)
    x = torch.from_numpy(images).requires_grad_(True)
    log_probs = torch.log_softmax(net((x[:, None] * 2.0 - 0.5) / 0.25), dim=1)
    loss = -log_probs[torch.arange(6), torch.from_numpy(labels)]
    (reference,) = torch.autograd.grad(loss.sum(), x)
    errors = per_sample_error(model.loss_gradient(images, labels), reference.numpy())
    print(f"\ntorch {exporter} export: onnx-ad vs autograd relative error median {np.median(errors):.1e}; "
          f"self-check {model.gradient_path.error:.1e}")
    assert np.median(errors) <= 1e-4


def handmade_onnx(path, op=None, domain="", batch="N", extra_inputs=()):
    """Conv (asymmetric pads) -> Relu -> Flatten -> [op] -> MatMul: logits of a 1-channel 8x8 NCHW model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    feat = 4 * 4 * 4
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.3, (feat, 3)).astype(np.float32), "G"),
             numpy_helper.from_array(np.ones(feat, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(feat, np.float32), "beta")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[0, 0, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"])]
    if op:
        nodes.append(helper.make_node(op, ["f", *extra_inputs], ["h"], domain=domain))
    nodes.append(helper.make_node("MatMul", ["h" if op else "f", "G"], ["logits"]))
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
                              [t for t in inits if t.name in used])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return path


def test_fixed_batch_model_predicts_and_differentiates_in_padded_chunks(tmp_path):
    dynamic = load_model(handmade_onnx(tmp_path / "dynamic.onnx"), {"classes": CLASSES})
    fixed = load_model(handmade_onnx(tmp_path / "fixed.onnx", batch=2), {"classes": CLASSES})
    assert fixed.batch == 2 and dynamic.batch is None
    images = np.random.default_rng(0).random((5, 8, 8), dtype=np.float32)
    labels = np.array([0, 1, 2, 0, 1])
    np.testing.assert_allclose(fixed.predict_proba(images), dynamic.predict_proba(images), atol=1e-6)
    assert fixed.can_craft and fixed.gradient_path.name == "onnx-ad"
    np.testing.assert_allclose(fixed.loss_gradient(images, labels), dynamic.loss_gradient(images, labels),
                               rtol=1e-5, atol=1e-7)


def test_op_onnx_ad_cannot_differentiate_falls_back_to_torch(tmp_path):
    pytest.importorskip("onnx2fx")
    path = handmade_onnx(tmp_path / "skipln.onnx", "SkipLayerNormalization", "com.microsoft",
                         extra_inputs=("f", "gamma", "beta"))
    model = load_model(path, {"classes": CLASSES})
    assert model.can_craft and model.gradient_path.name == "torch"
    assert model.gradient_path.error <= onnx_grad.MAX_REL_ERROR
    images = np.random.default_rng(1).random((40, 8, 8), dtype=np.float32)
    xi, _ = xi_for(images, "inf", 0.1)
    result = PaperUAP(attack_settings("inf", zeta=0.1, eps=0.02, max_iter=2)).craft(model, images, xi,
                                                                                    np.random.default_rng(0))
    assert result.steps > 0 and np.abs(result.rho).max() <= xi + 1e-7


def test_op_no_path_can_differentiate_is_refused_with_the_alternatives(tmp_path):
    model = load_model(handmade_onnx(tmp_path / "gelu.onnx", "Gelu", "com.microsoft"), {"classes": CLASSES})
    assert model.predict(np.zeros((2, 8, 8), np.float32)).shape == (2,)  # evaluation still works
    assert not model.can_craft
    message = model.craft_refusal
    assert "com.microsoft:Gelu" in message and "--surrogate MODEL" in message and "black-box" in message
    assert "\n" not in message
    with pytest.raises(AuditkitError, match="cannot be attacked white-box"):
        PaperUAP(attack_settings("inf")).craft(model, np.zeros((3, 8, 8), np.float32), 0.1, np.random.default_rng(0))


def test_self_check_refuses_a_wrong_gradient(tmp_path, monkeypatch):
    """Without the padding rewrite onnx-ad's gradient is wrong here: the self-check must catch it, and the
    torch path (when installed) takes over."""
    monkeypatch.setattr(onnx_grad, "explicit_pads", lambda model: model)
    model = load_model(handmade_onnx(tmp_path / "asym.onnx"), {"classes": CLASSES})
    try:
        import onnx2fx  # noqa: F401
    except ImportError:
        assert not model.can_craft
    else:
        assert model.gradient_path.name == "torch"
        monkeypatch.setattr(onnx_grad, "TorchGradient", NoTorch)
        model = load_model(handmade_onnx(tmp_path / "asym2.onnx"), {"classes": CLASSES})
        assert not model.can_craft
    assert "onnx-ad: its gradient disagrees with finite differences" in model.craft_refusal
    assert "torch: not installed" in model.craft_refusal and "auditkit[torch]" in model.craft_refusal


class NoTorch:
    """TorchGradient as it behaves where the torch extra is not installed."""

    name = "torch"

    def __init__(self, *args):
        raise ImportError("No module named 'torch'", name="torch")
