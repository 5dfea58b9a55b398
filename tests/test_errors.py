"""Every error path of the functional API: the exception type, and a message that
names the offending argument.  Nothing here may crash the interpreter."""

import datetime

import numpy as np
import pytest

import fastcnn
import fastcnn.functional as F

Z = np.zeros


def f(*shape):
    return np.ones(shape, dtype=np.float32)


X4, W4, B5 = f(2, 4, 8, 8), f(5, 4, 3, 3), f(5)
GO4 = f(2, 5, 6, 6)
X2, W2 = f(3, 6), f(4, 6)
LOGITS, TARGET = f(4, 5), np.array([0, 1, 4, 2])
RM, RV = Z(4, np.float32), np.ones(4, np.float32)
U8 = np.zeros((3, 4, 4), np.uint8)

# (id, callable, exception type(s), regex the message must contain)
CASES = [
    # ---------------------------------------------------------------- conv2d
    ("conv input 2d", lambda: F.conv2d(f(4, 8), W4), ValueError, "input"),
    ("conv input 5d", lambda: F.conv2d(f(1, 2, 4, 8, 8), W4), ValueError, "input"),
    ("conv weight 3d", lambda: F.conv2d(X4, f(5, 4, 3)), ValueError, "weight"),
    ("conv channels", lambda: F.conv2d(X4, f(5, 3, 3, 3)), ValueError, "weight"),
    ("conv channels unbatched", lambda: F.conv2d(f(4, 8, 8), f(5, 3, 3, 3)), ValueError,
     "weight"),
    ("conv groups not dividing C", lambda: F.conv2d(X4, f(6, 1, 3, 3), groups=3),
     ValueError, "groups"),
    ("conv groups not dividing K", lambda: F.conv2d(X4, f(5, 2, 3, 3), groups=2),
     ValueError, "groups"),
    ("conv groups 0", lambda: F.conv2d(X4, W4, groups=0), ValueError, "groups"),
    ("conv groups negative", lambda: F.conv2d(X4, W4, groups=-1), ValueError, "groups"),
    ("conv bias shape", lambda: F.conv2d(X4, W4, f(4)), ValueError, "bias"),
    ("conv bias 2d", lambda: F.conv2d(X4, W4, f(5, 1)), ValueError, "bias"),
    ("conv kernel > input", lambda: F.conv2d(f(1, 4, 2, 2), W4), ValueError,
     "kernel|weight|input"),
    ("conv kernel > padded input", lambda: F.conv2d(f(1, 4, 2, 8), f(5, 4, 5, 3), padding=1),
     ValueError, "kernel|weight|input"),
    ("conv dilated kernel > input", lambda: F.conv2d(f(1, 4, 4, 4), W4, dilation=2),
     ValueError, "kernel|weight|input|dilation"),
    ("conv stride 0", lambda: F.conv2d(X4, W4, stride=0), ValueError, "stride"),
    ("conv stride negative", lambda: F.conv2d(X4, W4, stride=-1), ValueError, "stride"),
    ("conv stride pair 0", lambda: F.conv2d(X4, W4, stride=(1, 0)), ValueError, "stride"),
    ("conv stride triple", lambda: F.conv2d(X4, W4, stride=(1, 1, 1)), (ValueError, TypeError),
     "stride"),
    ("conv stride float", lambda: F.conv2d(X4, W4, stride=1.5), (ValueError, TypeError),
     "stride"),
    ("conv dilation 0", lambda: F.conv2d(X4, W4, dilation=0), ValueError, "dilation"),
    ("conv dilation negative", lambda: F.conv2d(X4, W4, dilation=(1, -2)), ValueError,
     "dilation"),
    ("conv padding negative", lambda: F.conv2d(X4, W4, padding=-1), ValueError, "padding"),
    ("conv padding pair negative", lambda: F.conv2d(X4, W4, padding=(0, -1)), ValueError,
     "padding"),
    ("conv padding bad string", lambda: F.conv2d(X4, W4, padding="full"), ValueError,
     "padding"),
    ("conv padding same strided", lambda: F.conv2d(X4, W4, padding="same", stride=2),
     ValueError, "padding|stride"),
    ("conv zero channels", lambda: F.conv2d(f(2, 0, 8, 8), f(5, 0, 3, 3)), ValueError,
     "input|weight|channel"),
    ("conv zero height", lambda: F.conv2d(f(2, 4, 0, 8), W4), ValueError, "input|kernel"),
    ("conv complex input", lambda: F.conv2d(X4.astype(np.complex64), W4), TypeError, "input"),
    ("conv complex weight", lambda: F.conv2d(X4, W4.astype(np.complex128)), TypeError,
     "weight"),
    ("conv complex bias", lambda: F.conv2d(X4, W4, B5.astype(np.complex64)), TypeError,
     "bias"),
    ("conv object input", lambda: F.conv2d(X4.astype(object), W4), TypeError, "input"),
    ("conv str input", lambda: F.conv2d(np.full((2, 4, 8, 8), "a"), W4), TypeError, "input"),
    ("conv datetime input", lambda: F.conv2d(np.full((2, 4, 8, 8),
                                                     np.datetime64("2020-01-01")), W4),
     TypeError, "input"),
    ("conv ragged list", lambda: F.conv2d([[[[1.0, 2.0], [1.0]]]], W4),
     (TypeError, ValueError), "input"),
    ("conv_backward grad shape", lambda: F.conv2d_backward(f(2, 5, 5, 6), X4, W4), ValueError,
     "grad_output"),
    ("conv_backward grad channels", lambda: F.conv2d_backward(f(2, 4, 6, 6), X4, W4),
     ValueError, "grad_output"),
    ("conv_backward complex grad", lambda: F.conv2d_backward(GO4.astype(np.complex64), X4, W4),
     TypeError, "grad_output"),
    ("conv_backward channels", lambda: F.conv2d_backward(GO4, X4, f(5, 3, 3, 3)), ValueError,
     "weight"),
    ("conv_backward bias", lambda: F.conv2d_backward(GO4, X4, W4, f(3)), ValueError, "bias"),
    ("conv_backward stride 0", lambda: F.conv2d_backward(GO4, X4, W4, stride=0), ValueError,
     "stride"),
    # ---------------------------------------------------------------- linear
    ("linear weight 1d", lambda: F.linear(X2, f(6)), ValueError, "weight"),
    ("linear weight 3d", lambda: F.linear(X2, f(4, 6, 1)), ValueError, "weight"),
    ("linear in_features", lambda: F.linear(X2, f(4, 5)), ValueError, "weight"),
    ("linear bias shape", lambda: F.linear(X2, W2, f(3)), ValueError, "bias"),
    ("linear input 0d", lambda: F.linear(np.float32(1), W2), ValueError, "input"),
    ("linear complex input", lambda: F.linear(X2.astype(np.complex64), W2), TypeError,
     "input"),
    ("linear complex weight", lambda: F.linear(X2, W2.astype(np.complex64)), TypeError,
     "weight"),
    ("linear_backward grad shape", lambda: F.linear_backward(f(3, 5), X2, W2), ValueError,
     "grad_output"),
    ("linear_backward in_features", lambda: F.linear_backward(f(3, 4), X2, f(4, 5)),
     ValueError, "weight"),
    # ---------------------------------------------------------------- relu
    ("relu complex", lambda: F.relu(X2.astype(np.complex64)), TypeError, "input"),
    ("relu object", lambda: F.relu(np.array([1, "a"], dtype=object)), TypeError, "input"),
    ("relu str", lambda: F.relu("abc"), TypeError, "input"),
    ("relu_backward shape", lambda: F.relu_backward(f(3, 5), X2), ValueError, "grad_output"),
    ("relu_backward complex grad", lambda: F.relu_backward(X2.astype(np.complex64), X2),
     TypeError, "grad_output"),
    # ---------------------------------------------------------------- max_pool2d
    ("pool input 2d", lambda: F.max_pool2d(f(8, 8), 2), ValueError, "input"),
    ("pool input 5d", lambda: F.max_pool2d(f(1, 1, 1, 8, 8), 2), ValueError, "input"),
    ("pool kernel 0", lambda: F.max_pool2d(X4, 0), ValueError, "kernel_size"),
    ("pool kernel negative", lambda: F.max_pool2d(X4, (2, -1)), ValueError, "kernel_size"),
    ("pool stride 0", lambda: F.max_pool2d(X4, 2, stride=0), ValueError, "stride"),
    ("pool stride negative", lambda: F.max_pool2d(X4, 2, stride=(-1, 1)), ValueError,
     "stride"),
    ("pool dilation 0", lambda: F.max_pool2d(X4, 2, dilation=0), ValueError, "dilation"),
    ("pool padding negative", lambda: F.max_pool2d(X4, 2, padding=-1), ValueError, "padding"),
    ("pool padding > k/2", lambda: F.max_pool2d(X4, 3, padding=2), ValueError, "padding"),
    ("pool padding > k/2 pair", lambda: F.max_pool2d(X4, (3, 2), padding=(1, 2)), ValueError,
     "padding"),
    ("pool padding > k/2 k=1", lambda: F.max_pool2d(X4, 1, padding=1), ValueError, "padding"),
    ("pool kernel > input", lambda: F.max_pool2d(f(1, 1, 2, 2), 3), ValueError,
     "input|kernel_size"),
    ("pool zero height", lambda: F.max_pool2d(f(1, 1, 0, 4), 1), ValueError,
     "input|kernel_size"),
    ("pool complex", lambda: F.max_pool2d(X4.astype(np.complex64), 2), TypeError, "input"),
    ("pool_backward grad shape", lambda: F.max_pool2d_backward(f(2, 4, 3, 4), X4, 2),
     ValueError, "grad_output"),
    ("pool_backward indices shape",
     lambda: F.max_pool2d_backward(f(2, 4, 4, 4), X4, 2, indices=Z((2, 4, 4, 3), np.int64)),
     ValueError, "indices"),
    ("pool_backward indices out of range",
     lambda: F.max_pool2d_backward(f(2, 4, 4, 4), X4, 2,
                                   indices=np.full((2, 4, 4, 4), 64, np.int64)),
     ValueError, "indices"),
    ("pool_backward indices negative",
     lambda: F.max_pool2d_backward(f(2, 4, 4, 4), X4, 2,
                                   indices=np.full((2, 4, 4, 4), -1, np.int64)),
     ValueError, "indices"),
    ("pool_backward indices float",
     lambda: F.max_pool2d_backward(f(2, 4, 4, 4), X4, 2, indices=f(2, 4, 4, 4)),
     (TypeError, ValueError), "indices"),
    ("pool_backward padding > k/2", lambda: F.max_pool2d_backward(f(2, 4, 4, 4), X4, 2,
                                                                  padding=2),
     ValueError, "padding"),
    # ---------------------------------------------------------------- softmax
    ("softmax dim too big", lambda: F.softmax(X2, dim=2), ValueError, "dim"),
    ("softmax dim too small", lambda: F.softmax(X2, dim=-3), ValueError, "dim"),
    ("log_softmax dim", lambda: F.log_softmax(X2, dim=5), ValueError, "dim"),
    ("softmax complex", lambda: F.softmax(X2.astype(np.complex64)), TypeError, "input"),
    ("softmax_backward shape", lambda: F.softmax_backward(f(3, 5), X2), ValueError,
     "output"),
    ("log_softmax_backward shape", lambda: F.log_softmax_backward(f(3, 5), X2), ValueError,
     "output"),
    ("softmax_backward dim", lambda: F.softmax_backward(X2, X2, dim=2), ValueError, "dim"),
    # ---------------------------------------------------------------- cross_entropy
    ("ce target == C", lambda: F.cross_entropy(LOGITS, np.array([0, 1, 5, 2])), ValueError,
     "target"),
    ("ce target negative", lambda: F.cross_entropy(LOGITS, np.array([0, -1, 4, 2])),
     ValueError, "target"),
    ("ce target -100 not ignored", lambda: F.cross_entropy(LOGITS, np.array([0, -100, 4, 2]),
                                                           ignore_index=-1),
     ValueError, "target"),
    ("ce target huge", lambda: F.cross_entropy(LOGITS, np.array([0, 2 ** 40, 4, 2])),
     ValueError, "target"),
    ("ce target out of range reduction none",
     lambda: F.cross_entropy(LOGITS, np.array([0, 7, 4, 2]), reduction="none"), ValueError,
     "target"),
    ("ce float target", lambda: F.cross_entropy(LOGITS, TARGET.astype(np.float32)), TypeError,
     "target"),
    ("ce float64 target", lambda: F.cross_entropy(LOGITS, [0.0, 1.0, 4.0, 2.0]), TypeError,
     "target"),
    ("ce bool target", lambda: F.cross_entropy(LOGITS, TARGET.astype(bool)), TypeError,
     "target"),
    ("ce complex target", lambda: F.cross_entropy(LOGITS, TARGET.astype(np.complex64)),
     TypeError, "target"),
    ("ce target shape", lambda: F.cross_entropy(LOGITS, np.array([0, 1, 2])), ValueError,
     "target"),
    ("ce target extra dim", lambda: F.cross_entropy(LOGITS, TARGET[:, None]), ValueError,
     "target"),
    ("ce spatial target shape", lambda: F.cross_entropy(f(2, 3, 4), Z((2, 5), np.int64)),
     ValueError, "target"),
    ("ce input 0d", lambda: F.cross_entropy(np.float32(1), np.int64(0)), ValueError, "input"),
    ("ce zero classes", lambda: F.cross_entropy(f(3, 0), Z(3, np.int64)), ValueError,
     "input|target"),
    ("ce bad reduction", lambda: F.cross_entropy(LOGITS, TARGET, reduction="avg"), ValueError,
     "reduction"),
    ("ce reduction None", lambda: F.cross_entropy(LOGITS, TARGET, reduction=None),
     (ValueError, TypeError), "reduction"),
    ("ce label_smoothing < 0", lambda: F.cross_entropy(LOGITS, TARGET, label_smoothing=-0.1),
     ValueError, "label_smoothing"),
    ("ce label_smoothing > 1", lambda: F.cross_entropy(LOGITS, TARGET, label_smoothing=1.5),
     ValueError, "label_smoothing"),
    ("ce complex input", lambda: F.cross_entropy(LOGITS.astype(np.complex64), TARGET),
     TypeError, "input"),
    ("ce_backward grad shape none",
     lambda: F.cross_entropy_backward(f(3), LOGITS, TARGET, reduction="none"), ValueError,
     "grad_output"),
    ("ce_backward grad not scalar",
     lambda: F.cross_entropy_backward(f(4), LOGITS, TARGET, reduction="mean"), ValueError,
     "grad_output"),
    ("ce_backward target range",
     lambda: F.cross_entropy_backward(np.float32(1), LOGITS, np.array([0, 1, 5, 2])),
     ValueError, "target"),
    ("ce_backward float target",
     lambda: F.cross_entropy_backward(np.float32(1), LOGITS, TARGET.astype(np.float64)),
     TypeError, "target"),
    ("ce_backward bad reduction",
     lambda: F.cross_entropy_backward(np.float32(1), LOGITS, TARGET, reduction="max"),
     ValueError, "reduction"),
    ("ce_backward label_smoothing",
     lambda: F.cross_entropy_backward(np.float32(1), LOGITS, TARGET, label_smoothing=2.0),
     ValueError, "label_smoothing"),
    # ---------------------------------------------------------------- batch_norm
    ("bn input 1d", lambda: F.batch_norm(f(4), RM, RV), ValueError, "input"),
    ("bn input 0d", lambda: F.batch_norm(np.float32(1), RM, RV), ValueError, "input"),
    ("bn running_mean shape", lambda: F.batch_norm(X4, Z(3, np.float32), RV), ValueError,
     "running_mean"),
    ("bn running_var shape", lambda: F.batch_norm(X4, RM, np.ones(5, np.float32)), ValueError,
     "running_var"),
    ("bn running_mean shape training",
     lambda: F.batch_norm(X4, Z(3, np.float32), RV, training=True), ValueError,
     "running_mean"),
    ("bn weight shape", lambda: F.batch_norm(X4, RM, RV, f(3)), ValueError, "weight"),
    ("bn bias shape", lambda: F.batch_norm(X4, RM, RV, f(4), f(2, 2)), ValueError, "bias"),
    ("bn eval without running stats", lambda: F.batch_norm(X4, None, None, training=False),
     ValueError, "running"),
    ("bn eval without running_var", lambda: F.batch_norm(X4, RM, None, training=False),
     ValueError, "running_var"),
    ("bn training one value (N, C)", lambda: F.batch_norm(f(1, 4), None, None, training=True),
     ValueError, "input"),
    ("bn training one value (N, C, 1, 1)",
     lambda: F.batch_norm(f(1, 4, 1, 1), Z(4, np.float32), np.ones(4, np.float32),
                          training=True), ValueError, "input"),
    ("bn training one value (N, C, 1)",
     lambda: F.batch_norm(f(1, 4, 1), None, None, training=True), ValueError, "input"),
    ("bn zero channels", lambda: F.batch_norm(f(2, 0, 3, 3), None, None, training=True),
     ValueError, "input"),
    ("bn one value per channel training",
     lambda: F.batch_norm(f(1, 4, 1, 1), None, None, training=True), ValueError, "input"),
    ("bn eps zero training", lambda: F.batch_norm(X4, None, None, training=True, eps=0.0),
     ValueError, "eps"),
    ("bn eps str", lambda: F.batch_norm(X4, RM, RV, eps="1e-5"), TypeError, "eps"),
    ("bn momentum None", lambda: F.batch_norm(X4, Z(4, np.float32), np.ones(4, np.float32),
                                              training=True, momentum=None), TypeError,
     "momentum"),
    ("bn momentum str", lambda: F.batch_norm(X4, None, None, training=True, momentum="0.1"),
     TypeError, "momentum"),
    ("bn complex", lambda: F.batch_norm(X4.astype(np.complex64), RM, RV), TypeError, "input"),
    ("bn complex running_mean", lambda: F.batch_norm(X4, RM.astype(np.complex64), RV),
     TypeError, "running_mean"),
    ("bn_backward grad shape", lambda: F.batch_norm_backward(f(2, 4, 8, 7), X4, RM, RV),
     ValueError, "grad_output"),
    ("bn_backward eval without stats",
     lambda: F.batch_norm_backward(X4, X4, None, None, training=False), ValueError, "running"),
    ("bn_backward training one value",
     lambda: F.batch_norm_backward(f(1, 4), f(1, 4), None, None, training=True), ValueError,
     "input"),
    ("bn_backward weight shape",
     lambda: F.batch_norm_backward(X4, X4, RM, RV, f(5), training=False), ValueError,
     "weight"),
    # ---------------------------------------------------------------- dropout
    ("dropout p negative", lambda: F.dropout(X2, -0.1, seed=1), ValueError, r"\bp\b"),
    ("dropout p > 1", lambda: F.dropout(X2, 1.5, seed=1), ValueError, r"\bp\b"),
    ("dropout p nan", lambda: F.dropout(X2, float("nan"), seed=1), ValueError, r"\bp\b"),
    ("dropout p above one eval", lambda: F.dropout(X2, 1.01, training=False, seed=1),
     ValueError, r"\bp\b"),
    ("dropout seed negative", lambda: F.dropout(X2, 0.5, seed=-1), ValueError, "seed"),
    ("dropout seed too big", lambda: F.dropout(X2, 0.5, seed=2 ** 64), ValueError, "seed"),
    ("dropout offset negative", lambda: F.dropout(X2, 0.5, seed=1, offset=-1), ValueError,
     "offset"),
    ("dropout offset too big", lambda: F.dropout(X2, 0.5, seed=1, offset=2 ** 64), ValueError,
     "offset"),
    ("dropout complex", lambda: F.dropout(X2.astype(np.complex64), 0.5, seed=1), TypeError,
     "input"),
    ("dropout_backward p", lambda: F.dropout_backward(X2, 1.5, seed=1), ValueError, r"\bp\b"),
    ("dropout_backward no seed", lambda: F.dropout_backward(X2, 0.5), (TypeError, ValueError),
     "seed"),
    ("dropout_backward seed None", lambda: F.dropout_backward(X2, 0.5, seed=None),
     (TypeError, ValueError), "seed"),
    ("dropout_backward seed negative", lambda: F.dropout_backward(X2, 0.5, seed=-5),
     ValueError, "seed"),
    ("dropout_mask p", lambda: F.dropout_mask((3, 4), 1.5, 1), ValueError, r"\bp\b"),
    ("dropout_mask p negative", lambda: F.dropout_mask((3, 4), -0.5, 1), ValueError,
     r"\bp\b"),
    ("dropout_mask seed", lambda: F.dropout_mask((3, 4), 0.5, -1), ValueError, "seed"),
    ("dropout_mask shape negative", lambda: F.dropout_mask((3, -4), 0.5, 1), ValueError,
     "shape"),
    # ---------------------------------------------------------------- normalize
    ("normalize float input", lambda: F.normalize(U8.astype(np.float32)), TypeError, "input"),
    ("normalize int16 input", lambda: F.normalize(U8.astype(np.int16)), TypeError, "input"),
    ("normalize int8 input", lambda: F.normalize(U8.astype(np.int8)), TypeError, "input"),
    ("normalize list input", lambda: F.normalize([[1, 2], [3, 4]]), TypeError, "input"),
    ("normalize std zero", lambda: F.normalize(U8, 0.5, 0.0), ValueError, "std"),
    ("normalize std zero channel", lambda: F.normalize(U8, [0.5] * 3, [1.0, 0.0, 1.0]),
     ValueError, "std"),
    ("normalize mean length", lambda: F.normalize(U8, [0.5, 0.5], [1.0, 1.0, 1.0]),
     ValueError, "mean"),
    ("normalize std length", lambda: F.normalize(U8, [0.5] * 3, [1.0] * 4), ValueError,
     "std"),
    ("normalize dim out of range", lambda: F.normalize(U8, [0.5] * 3, [1.0] * 3, dim=3),
     ValueError, "dim"),
    ("normalize dim out of range 2d",
     lambda: F.normalize(np.zeros((3, 4), np.uint8), [0.5] * 3, [1.0] * 3), ValueError,
     "dim"),
    ("normalize complex mean", lambda: F.normalize(U8, 0.5 + 1j, 1.0), TypeError, "mean"),
    # ------------------------------------------------- argument shapes of the backwards
    ("conv2d_backward output_mask length",
     lambda: F.conv2d_backward(f(2, 5, 6, 6), X4, W4, output_mask=(True, True)), ValueError,
     "output_mask must be three flags"),
    ("linear_backward output_mask bool",
     lambda: F.linear_backward(f(3, 4), f(3, 6), W2, output_mask=True), ValueError,
     "output_mask must be three flags"),
    ("pad_backward input_shape int", lambda: F.pad_backward(f(4), 2, (1, 1)), TypeError,
     "input_shape"),
    ("softmax_backward dim empty", lambda: F.softmax_backward(f(2, 0), f(2, 0), dim=7),
     ValueError, "dim"),
    ("cross_entropy_backward reduction where weight goes",
     lambda: F.cross_entropy_backward(1.0, f(3, 4), np.array([0, 1, 2]), "mean"), TypeError,
     "cross_entropy's order"),
    ("cross_entropy probabilities ignore_index",
     lambda: F.cross_entropy(f(3, 4), np.full((3, 4), 0.25), ignore_index=0), ValueError,
     "ignore_index is not supported"),
    ("cross_entropy reduction array",
     lambda: F.cross_entropy(f(3, 4), np.array([0, 1, 2]), None, np.ones(2)), ValueError,
     "reduction must be one of"),
    # ------------------------------------------- integers past 64 bits, named
    ("conv stride 2**63", lambda: F.conv2d(f(1, 1, 4, 4), f(1, 1, 2, 2), stride=2 ** 63),
     ValueError, "stride must fit in 64 bits"),
    ("pool padding 2**63", lambda: F.max_pool2d(f(1, 1, 4, 4), 2, padding=2 ** 63),
     ValueError, "padding must fit in 64 bits"),
    ("ce ignore_index 2**70", lambda: F.cross_entropy(LOGITS, TARGET, ignore_index=2 ** 70),
     ValueError, "ignore_index must fit in 64 bits"),
    ("pad past 64 bits", lambda: F.pad(f(1, 1, 4, 4), (2 ** 62, 0)), ValueError,
     "pad: padding .* gives"),
    # ---------------------------------------------------------------- threads
    ("threads 0", lambda: fastcnn.set_num_threads(0), ValueError, "."),
    ("threads negative", lambda: fastcnn.set_num_threads(-2), ValueError, "."),
    ("threads huge", lambda: fastcnn.set_num_threads(2 ** 40), ValueError, "n must be in"),
    ("threads float", lambda: fastcnn.set_num_threads(1.5), (TypeError, ValueError), "."),
    ("threads str", lambda: fastcnn.set_num_threads("2"), (TypeError, ValueError), "."),
]


@pytest.mark.parametrize("fn, exc, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error(fn, exc, match, restore_threads):
    with pytest.raises(exc, match=match):
        fn()


def test_error_message_shows_shapes():
    """As in the spec's example: the message shows the offending shapes."""
    with pytest.raises(ValueError) as info:
        F.conv2d(X4, f(5, 3, 3, 3))
    msg = str(info.value)
    assert "weight" in msg and "(2, 4, 8, 8)" in msg and "(5, 3, 3, 3)" in msg, msg
    with pytest.raises(ValueError) as info:
        F.linear(X2, f(4, 5))
    msg = str(info.value)
    assert "(3, 6)" in msg and "(4, 5)" in msg, msg


def test_failed_call_leaves_running_stats_untouched():
    rm, rv = Z(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(ValueError):
        F.batch_norm(f(2, 4, 3, 3), rm, rv, f(3), training=True)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_batch_norm_training_running_stats_that_cannot_be_updated_in_place():
    """Running stats must be updated in place: a float64 / non-contiguous / list
    running_mean either raises naming it, or is really updated."""
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    want_rm = 0.1 * x.astype(np.float64).mean(axis=0)
    for rm in (Z(4, np.float64), Z(8, np.float32)[::2]):
        rv = np.ones(4, np.float32)
        try:
            F.batch_norm(x, rm, rv, training=True, momentum=0.1)
        except (TypeError, ValueError) as e:
            assert "running_mean" in str(e), str(e)
        else:
            np.testing.assert_allclose(rm, want_rm, rtol=1e-5,
                                       err_msg=f"{rm.dtype} running_mean not updated")
    with pytest.raises((TypeError, ValueError), match="running_mean"):
        F.batch_norm(x, [0.0] * 4, rv, training=True)


# Empty inputs where an empty result is meaningful: either a correct empty float32
# result or a ValueError naming the argument -- never a crash.
EMPTY = [
    ("relu", lambda: F.relu(f(0, 3)), (0, 3)),
    ("conv2d batch 0", lambda: F.conv2d(f(0, 4, 8, 8), W4), (0, 5, 6, 6)),
    ("conv2d_backward batch 0", lambda: F.conv2d_backward(f(0, 5, 6, 6), f(0, 4, 8, 8), W4)[0],
     (0, 4, 8, 8)),
    ("conv2d zero out channels", lambda: F.conv2d(X4, f(0, 4, 3, 3)), (2, 0, 6, 6)),
    ("linear batch 0", lambda: F.linear(f(0, 6), W2), (0, 4)),
    ("max_pool2d batch 0", lambda: F.max_pool2d(f(0, 3, 4, 4), 2), (0, 3, 2, 2)),
    ("softmax batch 0", lambda: F.softmax(f(0, 5), dim=1), (0, 5)),
    ("softmax empty dim", lambda: F.softmax(f(3, 0), dim=1), (3, 0)),
    ("batch_norm eval batch 0", lambda: F.batch_norm(f(0, 4), RM, RV), (0, 4)),
    ("dropout empty", lambda: F.dropout(f(0, 3), 0.5, seed=1), (0, 3)),
    ("normalize empty", lambda: F.normalize(np.zeros((0, 3, 2, 2), np.uint8)), (0, 3, 2, 2)),
]


@pytest.mark.parametrize("fn, shape", [c[1:] for c in EMPTY], ids=[c[0] for c in EMPTY])
def test_empty_inputs(fn, shape):
    try:
        out = fn()
    except ValueError as e:
        assert any(name in str(e) for name in ("input", "weight", "grad_output")), str(e)
        return
    assert isinstance(out, np.ndarray) and out.shape == shape and out.dtype == np.float32


def test_datetime_and_timedelta_rejected():
    for bad in (np.array([datetime.datetime(2020, 1, 1)] * 3, dtype="datetime64[s]"),
                np.array([1, 2, 3], dtype="timedelta64[s]")):
        with pytest.raises(TypeError, match="input"):
            F.relu(bad)


def test_softmax_0d_input():
    """The spec asks for ndim >= 1; torch accepts a 0-d input (softmax 1, log_softmax 0).
    Either is fine -- a ValueError naming input, or a 0-d result -- a shape change is not."""
    for fn, want in ((F.softmax, 1.0), (F.log_softmax, 0.0)):
        try:
            out = fn(np.float32(2.5))
        except ValueError as e:
            assert "input" in str(e), str(e)
            continue
        assert np.shape(out) == () and out == want, repr(out)


@pytest.mark.parametrize("bad", [2.0, (2.0, 2), True, (True, 1), np.int64(2) + 0.5])
def test_cached_geometry_never_admits_an_equal_but_invalid_argument(bad):
    """Geometries are cached per call signature: a float or bool equal to a
    cached int must still be refused (2.0 == 2, True == 1 in Python)."""
    x, w = np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 1, 2, 2), np.float32)
    for _ in range(2):
        F.conv2d(x, w, stride=2)
        F.conv2d(x, w, stride=1)
        F.max_pool2d(x, 2)
        F.max_pool2d(x, 1)
        with pytest.raises(TypeError):
            F.conv2d(x, w, stride=bad)
        with pytest.raises(TypeError):
            F.max_pool2d(x, bad)
