"""The losses transcribed literally, one row and one candidate at a time, in plain Python floats.

Independent of the package: it shares no code with it and uses no tensor operation beyond reading
the inputs. Each function returns, per crop and row, the online distribution P over the row's online
candidate set, the target w over that set, the candidates' origins and the loss −Σ_k w_k log P_k.
"""

import math


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _softmax(logits, ks):
    top = max(logits[k] for k in ks)
    total = sum(math.exp(logits[k] - top) for k in ks)
    return {k: math.exp(logits[k] - top) / total for k in ks}


def rows(
    loss,
    query,
    key,
    queue=None,
    *,
    temperature,
    target_temperature=1.0,
    coeff=None,
    include_keys=False,
):
    """[(crop, row, loss_i, P_i, w_i, origin)] where origin[k] is ("key", j) or ("queue", j)."""
    query, key = query.tolist(), key.tolist()
    crops = query if isinstance(query[0][0], list) else [query]
    queue = None if queue is None else queue.tolist()
    out = []
    for v, crop in enumerate(crops):
        for i, (q, k_i) in enumerate(zip(crop, key)):
            if queue is None:
                origin, pos = [("key", j) for j in range(len(key))], i
            elif include_keys:
                origin = [("key", j) for j in range(len(key))] + [
                    ("queue", j) for j in range(len(queue))
                ]
                pos = i
            else:
                origin, pos = [("key", i)] + [("queue", j) for j in range(len(queue))], 0
            cands = [key[j] if kind == "key" else queue[j] for kind, j in origin]
            a = [_dot(q, c) / temperature for c in cands]
            b = [_dot(k_i, c) / target_temperature for c in cands]
            every = list(range(len(cands)))
            negatives = [k for k in every if k != pos]
            if loss == "infonce":
                online, target = _softmax(a, every), {k: float(k == pos) for k in every}
            elif loss == "ressl":
                online, target = _softmax(a, negatives), _softmax(b, negatives)
            else:
                online, s2 = _softmax(a, every), _softmax(b, negatives)
                target = {k: coeff * (k == pos) + (1 - coeff) * s2.get(k, 0.0) for k in every}
            value = -sum(target[k] * math.log(online[k]) for k in online if target[k] > 0)
            out.append((v, i, value, online, target, origin))
    return out


def key_and_query_gradients(loss, query, key, queue=None, *, temperature, **kw):
    """Gradients of the mean loss: ∂loss_i/∂a_ik = P_ik − w_ik, a_ik = q_i·c_k/τ, w constant."""
    table = rows(loss, query, key, queue, temperature=temperature, **kw)
    count = len(table)
    crops = query.tolist() if query.dim() == 3 else [query.tolist()]
    keys, bank = key.tolist(), None if queue is None else queue.tolist()
    dim = len(keys[0])
    grad_key = [[0.0] * dim for _ in keys]
    grad_query = [[[0.0] * dim for _ in keys] for _ in crops]
    for v, i, _, online, target, origin in table:
        q = crops[v][i]
        for k, p in online.items():
            scale = (p - target[k]) / (temperature * count)
            kind, j = origin[k]
            c = keys[j] if kind == "key" else bank[j]
            for d in range(dim):
                grad_query[v][i][d] += scale * c[d]
                if kind == "key":
                    grad_key[j][d] += scale * q[d]
    return grad_query if query.dim() == 3 else grad_query[0], grad_key
