import numpy as np
import pytest

from lit_llmtime.data.simulate import simulate
from lit_llmtime.text.codec import decode, encode, global_alpha, scale_alpha

# The report's examples (section 2): inputs, alpha to 3 d.p., text and Qwen2.5 token ids.
EXAMPLES = [
    (
        [[2.9, 1.1], [3.2, 0.9], [3.8, 0.7], [4.5, 0.6], [5.1, 0.5]],
        0.498,
        "5.82,2.21;6.43,1.81;7.63,1.41;9.04,1.20;10.24,1.00",
        [
            20,
            13,
            23,
            17,
            11,
            17,
            13,
            17,
            16,
            26,
            21,
            13,
            19,
            18,
            11,
            16,
            13,
            23,
            16,
            26,
            22,
            13,
            21,
            18,
            11,
            16,
            13,
            19,
            16,
            26,
            24,
            13,
            15,
            19,
            11,
            16,
            13,
            17,
            15,
            26,
            16,
            15,
            13,
            17,
            19,
            11,
            16,
            13,
            15,
            15,
        ],
    ),
    (
        [[1.5, 2.8], [1.8, 2.5], [2.1, 2.2], [2.4, 1.9], [2.7, 1.6]],
        0.274,
        "5.47,10.22;6.57,9.12;7.66,8.03;8.76,6.93;9.85,5.84",
        [
            20,
            13,
            19,
            22,
            11,
            16,
            15,
            13,
            17,
            17,
            26,
            21,
            13,
            20,
            22,
            11,
            24,
            13,
            16,
            17,
            26,
            22,
            13,
            21,
            21,
            11,
            23,
            13,
            15,
            18,
            26,
            23,
            13,
            22,
            21,
            11,
            21,
            13,
            24,
            18,
            26,
            24,
            13,
            23,
            20,
            11,
            20,
            13,
            23,
            19,
        ],
    ),
]


@pytest.mark.parametrize(("series", "alpha", "text", "token_ids"), EXAMPLES)
def test_report_examples(tokenizer, series, alpha, text, token_ids):
    encoded, computed_alpha = encode(np.array(series))
    assert round(computed_alpha, 3) == alpha
    assert encoded == text
    assert tokenizer(encoded, add_special_tokens=False)["input_ids"] == token_ids


def test_single_characters_are_single_tokens(tokenizer):
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in "0123456789,.;-"]
    assert ids == [[15 + d] for d in range(10)] + [[11], [13], [26], [12]]


def test_round_trip_bound_on_1000_trajectories():
    trajectories, _ = simulate(n=1000, steps=100, seed=3)
    for decimals in (2, 3):
        for trajectory in trajectories:
            text, alpha = encode(trajectory, decimals=decimals)
            decoded = decode(text, alpha)
            assert decoded.n_valid == 100
            error = np.abs(decoded.values - trajectory.astype(np.float64)).max()
            assert error <= 0.5 * 10**-decimals * alpha * (1 + 1e-9)


def test_negative_values_and_no_negative_zero():
    text, alpha = encode(np.array([[-1.0, 2.0], [-0.0001, 1.0]]), alpha=0.1)
    assert text == "-10.00,20.00;0.00,10.00"
    assert np.allclose(decode(text, alpha).values, [[-1.0, 2.0], [0.0, 1.0]])


def test_given_and_global_alpha():
    trajectories = np.stack([np.full((4, 2), 1.0), np.full((4, 2), 3.0)])
    assert global_alpha(trajectories) == pytest.approx(0.3)
    assert encode(trajectories[0], alpha=0.5)[0] == "2.00,2.00;2.00,2.00;2.00,2.00;2.00,2.00"
    assert scale_alpha(trajectories[1]) == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("text", "expected", "n_valid"),
    [
        ("1.00,2.00;3.00,4.00", [[1, 2], [3, 4]], 2),
        ("1.00,2.00;3.00,4.00;", [[1, 2], [3, 4]], 2),  # trailing separator
        ("1.00,2.00;;3.00,4.00", [[1, 2], [None, None], [3, 4]], 2),  # empty step
        ("1.00;3.00,4.00", [[None, None], [3, 4]], 1),  # missing value
        ("1.00,2.00,5.00;3.00,4.00", [[None, None], [3, 4]], 1),  # extra value
        ("1..2,2.00;3.00,4.00", [[None, None], [3, 4]], 1),  # double point
        ("1.00,2.00;3.00,4.00<|im_end|>abc", [[1, 2], [None, None]], 1),  # trailing junk
        ("1.00,2.00;3.0", [[1, 2], [None, None]], 1),  # cut-off last step
        ("", [], 0),
        ("garbage", [[None, None]], 0),
        ("1.00,nan;inf,2", [[None, None], [None, None]], 0),  # non-finite numbers are not values
    ],
)
def test_decode_messy_text(text, expected, n_valid):
    decoded = decode(text, alpha=2.0)
    want = np.array([[np.nan if v is None else 2.0 * v for v in row] for row in expected]).reshape(-1, 2)
    np.testing.assert_array_equal(decoded.values, want)
    assert decoded.n_valid == n_valid
    assert decoded.valid.sum() == n_valid


def test_decode_to_fixed_number_of_steps():
    decoded = decode("1,2;3,4;5,6", alpha=1.0, steps=2)
    np.testing.assert_array_equal(decoded.values, [[1, 2], [3, 4]])
    padded = decode("1,2", alpha=1.0, steps=3)
    assert padded.values.shape == (3, 2) and padded.n_valid == 1 and np.isnan(padded.values[1:]).all()


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_decode_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        decode("1,2", alpha)


@pytest.mark.parametrize(
    ("trajectory", "message"),
    [
        (np.zeros((5, 2)), "all values are zero"),
        (np.array([[1.0, np.nan], [1.0, 2.0]]), "non-finite value nan at step 0, variable 1"),
        (np.array([[1.0, 2.0], [np.inf, 2.0]]), "non-finite value inf at step 1, variable 0"),
        (np.ones(5), r"expected shape \(steps, variables\), got \(5,\)"),
    ],
)
def test_encode_rejects_bad_trajectories_naming_the_sample(trajectory, message):
    with pytest.raises(ValueError, match=rf"sample 7: {message}"):
        encode(trajectory, name="sample 7")


def test_log_transform_writes_floored_signed_logs_of_the_scaled_values_and_decodes_them_back():
    trajectory = np.array([[0.0, 2.0], [9.0, 0.5]])
    text, alpha = encode(trajectory, alpha=0.5, decimals=3, transform="log")
    assert text == "0.000,5.994;7.496,4.615"  # log(1 + v / 0.01) of v = 0, 4, 18, 1
    np.testing.assert_allclose(decode(text, alpha, transform="log").values, trajectory, rtol=1e-3)
    negative, _ = encode(np.array([[-3.0, 1.0]]), alpha=1.0, decimals=2, transform="log")
    assert negative == "-5.71,4.62"  # odd: negative values keep their sign
    assert decode(negative, 1.0, transform="log").values[0, 0] == pytest.approx(-0.01 * np.expm1(5.71))
    overflow = decode("999.0,1.0;1.0,1.0", 1.0, transform="log")  # a number past float range: an invalid step
    assert np.isnan(overflow.values[0]).all() and overflow.n_valid == 1 and overflow.valid.tolist() == [False, True]
    with pytest.raises(ValueError, match="unknown encoding transform 'log1p'"):
        encode(trajectory, alpha=1.0, transform="log1p")


def test_log_keeps_relative_resolution_where_one_decimal_loses_the_troughs():
    trough_and_peak = np.array([[0.012], [0.020], [11.0], [13.0]])  # scaled prey: two troughs, two peaks
    plain = decode(encode(trough_and_peak, alpha=1.0, decimals=1)[0], 1.0, n_variables=1).values
    logged = decode(encode(trough_and_peak, alpha=1.0, decimals=1, transform="log")[0], 1.0, 1, None, "log").values
    assert plain[:2, 0].tolist() == [0.0, 0.0]  # both troughs written as 0.0
    np.testing.assert_allclose(logged[:, 0], trough_and_peak[:, 0], rtol=0.06)  # each within 6%, a half step of 0.1
