"""CACR and ReCo transcribed literally, one row and one candidate at a time, in plain Python floats.

Independent of the package: it shares no code with it and uses no tensor operation beyond reading
the inputs. Each function returns the per-row losses, in the order (view, row), and the gradients
of their mean, as nested lists shaped like the inputs (weights and targets held constant).
"""

import math


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _squared_distance(u, v):
    return sum((a - b) ** 2 for a, b in zip(u, v))


def _softmax(logits):
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    return [e / sum(exps) for e in exps]


def _zeros_like(nested):
    return [_zeros_like(x) for x in nested] if isinstance(nested, list) else 0.0


def _add(target, scale, vector):
    for d, x in enumerate(vector):
        target[d] += scale * x


def _views(x):
    """(views as a list of (N, D) lists, whether x had a view axis)."""
    x = x.tolist()
    return (x, True) if isinstance(x[0][0], list) else ([x], False)


def cacr(
    query,
    key,
    queue=None,
    *,
    attraction_temperature=1.0,
    repulsion_temperature=1.0,
    attraction_weight=1.0,
    repulsion_weight=1.0,
    intra_batch=True,
):
    """loss_vi = α Σ_u w⁺_u ‖q_vi − k_ui‖² − β Σ_j w⁻_j ‖q_vi − n_j‖², w⁺ = softmax(τ⁺ c⁺),
    w⁻ = softmax(−τ⁻ c⁻); positives: every key view u of row i, but u ≠ v when key and query both
    have the same V ≥ 2 views; negatives: the queue, then the other rows j ≠ i of view v.
    Returns (losses, grad_query, grad_key)."""
    views, query_has_views = _views(query)
    key_views, key_has_views = _views(key)
    queue = [] if queue is None else queue.tolist()
    leave_own_out = query_has_views and key_has_views and len(views) == len(key_views) >= 2
    count = len(views) * len(views[0])
    grad_query, grad_key = _zeros_like(views), _zeros_like(key_views)
    losses = []
    for v, view in enumerate(views):
        for i, q in enumerate(view):
            positives = [u for u in range(len(key_views)) if not (leave_own_out and u == v)]
            cost = [_squared_distance(q, key_views[u][i]) for u in positives]
            weights = _softmax([attraction_temperature * c for c in cost])
            attraction = attraction_weight * sum(w * c for w, c in zip(weights, cost))
            for u, w in zip(positives, weights):
                difference = [a - b for a, b in zip(q, key_views[u][i])]
                scale = 2 * attraction_weight * w / count
                _add(grad_query[v][i], scale, difference)
                _add(grad_key[u][i], -scale, difference)

            negatives = [("queue", j) for j in range(len(queue))]
            if intra_batch:
                negatives += [("query", j) for j in range(len(view)) if j != i]
            vectors = [queue[j] if kind == "queue" else view[j] for kind, j in negatives]
            cost = [_squared_distance(q, n) for n in vectors]
            weights = _softmax([-repulsion_temperature * c for c in cost])
            repulsion = -repulsion_weight * sum(w * c for w, c in zip(weights, cost))
            for (kind, j), n, w in zip(negatives, vectors, weights):
                difference = [a - b for a, b in zip(q, n)]
                scale = -2 * repulsion_weight * w / count
                _add(grad_query[v][i], scale, difference)
                if kind == "query":
                    _add(grad_query[v][j], -scale, difference)
            losses.append(attraction + repulsion)
    return (
        losses,
        grad_query if query_has_views else grad_query[0],
        grad_key if key_has_views else grad_key[0],
    )


def reco(
    query,
    key,
    queue,
    *,
    weak_key,
    weak_queue,
    mixed_query,
    mixed_key,
    temperature,
    relation_temperature,
    target_temperature,
    global_weight,
    local_weight,
):
    """loss_vi = −log softmax([q·k_i, q·Q_j] / τ)[0]
    + λ₁·(−Σ_j softmax(wk_i·W_j / τ_t)_j log softmax(q·W_j / τ_s)_j)
    + λ₂·(−log softmax([m·mk_i, m·Q_j] / τ)[0]), q = query_vi, m = mixed_query_vi (or _i).
    Returns (losses, grad_query, grad_key, grad_mixed_query)."""
    views, query_has_views = _views(query)
    mixed_views, mixed_has_views = _views(mixed_query)
    key, weak_key, mixed_key = key.tolist(), weak_key.tolist(), mixed_key.tolist()
    queue, weak_queue = queue.tolist(), weak_queue.tolist()
    count = len(views) * len(views[0])
    grad_query, grad_key, grad_mixed = (
        _zeros_like(views),
        _zeros_like(key),
        _zeros_like(mixed_views),
    )
    losses = []
    for v, view in enumerate(views):
        m_v = v if mixed_has_views else 0
        for i, q in enumerate(view):
            candidates = [key[i]] + queue
            p = _softmax([_dot(q, c) / temperature for c in candidates])
            instance = -math.log(p[0])
            for k, c in enumerate(candidates):
                _add(grad_query[v][i], (p[k] - (k == 0)) / (temperature * count), c)
            _add(grad_key[i], (p[0] - 1) / (temperature * count), q)

            online = _softmax([_dot(q, c) / relation_temperature for c in weak_queue])
            target = _softmax([_dot(weak_key[i], c) / target_temperature for c in weak_queue])
            relation = -sum(t * math.log(s) for t, s in zip(target, online))
            for c, s, t in zip(weak_queue, online, target):
                _add(grad_query[v][i], global_weight * (s - t) / (relation_temperature * count), c)

            m = mixed_views[m_v][i]
            candidates = [mixed_key[i]] + queue
            p = _softmax([_dot(m, c) / temperature for c in candidates])
            local = -math.log(p[0])
            for k, c in enumerate(candidates):
                _add(
                    grad_mixed[m_v][i], local_weight * (p[k] - (k == 0)) / (temperature * count), c
                )
            losses.append(instance + global_weight * relation + local_weight * local)
    return (
        losses,
        grad_query if query_has_views else grad_query[0],
        grad_key,
        grad_mixed if mixed_has_views else grad_mixed[0],
    )


def interpolated_key(query, key, index, ratio):
    """normalise(r·query_i + (1 − r)·key[index[i]]) per row, r a number or one per row."""
    rows = []
    for i, (q, j) in enumerate(zip(query.tolist(), index.tolist())):
        r = ratio[i] if isinstance(ratio, list) else ratio
        mixed = [r * a + (1 - r) * b for a, b in zip(q, key.tolist()[j])]
        norm = math.sqrt(sum(x * x for x in mixed))
        rows.append([x / norm for x in mixed])
    return rows
