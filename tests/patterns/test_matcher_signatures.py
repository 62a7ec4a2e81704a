"""Calls are read through the called function's signature: a pattern may use any torch function, its arguments
given by position or by keyword, and match a model that gives them the other way (or leaves defaults out), with
nothing in the matcher knowing that function."""
import pytest
import torch
import torch.nn.functional as F

from liger_compile.matcher import op_name, try_match
from liger_compile.pattern import Pattern
from liger_compile.patterns.causal_mask import masked_sdpa

D = 16


def dynamo_graph(fn, *args) -> torch.fx.Graph:
    """The graph Dynamo hands a backend for fn(*args)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    torch.compile(fn, backend=capture, fullgraph=True)(*args)
    (graph,) = graphs
    return graph


def match(search, fn, *args, root: str):
    """try_match of `search` against Dynamo's graph of fn(*args), at its last `root` op."""
    graph = dynamo_graph(fn, *args)
    node = [n for n in graph.nodes if op_name(n) == root][-1]
    m, failure, _ = try_match(Pattern("test", "signatures", search, search).graph, node)
    return m, failure


# --- F.layer_norm: positional in one, keywords (and a default left out) in the other ---------------------------
def layer_norm_positional(x, shape, weight, bias, eps):
    return F.layer_norm(x, shape, weight, bias, eps)


def layer_norm_keywords(x, shape, weight, bias, eps):
    return F.layer_norm(x, normalized_shape=shape, weight=weight, bias=bias, eps=eps)


def model_layer_norm_keywords(x, w):
    return F.layer_norm(x, normalized_shape=(D,), weight=w, eps=1e-5) * 2  # bias left to its default


def model_layer_norm_positional(x, w):
    return F.layer_norm(x, (D,), w, None, 1e-5) * 2


@pytest.mark.parametrize("search, model", [(layer_norm_positional, model_layer_norm_keywords),
                                           (layer_norm_keywords, model_layer_norm_positional)])
def test_layer_norm_matches_the_other_way_round(search, model):
    m, failure = match(search, model, torch.randn(2, 3, D), torch.randn(D), root="layer_norm")
    assert m is not None, failure
    assert tuple(m["shape"]) == (D,) and m["bias"] is None and m["eps"] == 1e-5
    assert m.value("weight").shape == (D,)


# --- torch.var_mean: a layer norm written by hand -----------------------------------------------------------------
def var_mean_norm(x, dim, eps):
    var, mean = torch.var_mean(x, dim, correction=0, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def model_var_mean_keywords(x):
    var, mean = torch.var_mean(x, keepdim=True, dim=-1, correction=0)
    return (x - mean) / torch.sqrt(var + 1e-6)


def model_var_mean_other_correction(x):
    var, mean = torch.var_mean(x, -1, correction=1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6)


def test_var_mean_matches_keywords_in_any_order():
    m, failure = match(var_mean_norm, model_var_mean_keywords, torch.randn(4, D), root="div")
    assert m is not None, failure
    assert m["dim"] == -1 and m["eps"] == 1e-6


def test_var_mean_with_another_correction_does_not_match():
    m, failure = match(var_mean_norm, model_var_mean_other_correction, torch.randn(4, D), root="div")
    assert m is None and "expected the constant 0, found the constant 1" in failure.reason, failure


# --- Tensor.var as a method in the pattern, torch.var as a function in the model -----------------------------------
def var_method(x, dim):
    return x.var(dim, unbiased=False, keepdim=True) + 1


def model_var_function(x):
    return torch.var(x, -1, False, True) + 1


def model_var_unbiased(x):
    return torch.var(x, dim=-1, keepdim=True) + 1  # unbiased, its default


def test_var_method_matches_the_function_called_positionally():
    m, failure = match(var_method, model_var_function, torch.randn(4, D), root="add")
    assert m is not None, failure
    assert m["dim"] == -1


def test_var_left_at_its_default_is_not_the_unbiased_false_pattern():
    m, failure = match(var_method, model_var_unbiased, torch.randn(4, D), root="add")
    assert m is None, m


# --- a list argument given as separate arguments -----------------------------------------------------------------
def view_items(x, rows):
    return x.view(rows, -1) * 2


def model_view_tuple(x):
    return x.view((4, -1)) * 2


def test_view_items_match_a_view_given_a_tuple():
    m, failure = match(view_items, model_view_tuple, torch.randn(4, 2, 8), root="mul")
    assert m is not None, failure
    assert m["rows"] == 4


# --- a shipped pattern: the masked SDPA call (keywords) against a model that passes everything by position --------
def model_sdpa_positional(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, mask, 0.0, False)


def test_masked_sdpa_pattern_matches_positional_arguments():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    m, failure = match(masked_sdpa, model_sdpa_positional, q, k, v, mask, root="scaled_dot_product_attention")
    assert m is not None, failure
    assert m["dropout_p"] == 0.0 and m["scale"] is None and m["enable_gqa"] is False
