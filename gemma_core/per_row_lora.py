"""A projection's output plus each row's own LoRA update (adapter slots)."""

from keras import ops


def add_per_row_lora(y, x, lora, target, down, up):
    """`y` (a projection of `x`) plus each row's `x @ a @ b`, where `lora`
    (see LoraSlotTable.rows) holds `target`'s factors per row; `y` as it
    is when there are none. The update is computed in float32 and added in
    y's dtype.

    Args:
        down, up: the two einsums, x with a and then the result with b, e.g.
            "btd,bndr->btnr" and "btnr,bnrh->btnh" for the query.
    """
    if lora is None or target not in lora:
        return y
    a, b = lora[target]
    low = ops.einsum(down, ops.cast(x, "float32"), ops.cast(a, "float32"))
    return y + ops.cast(ops.einsum(up, low, ops.cast(b, "float32")), y.dtype)
