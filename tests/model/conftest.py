from tests.model.ref_attention import ensure_ops

ensure_ops()
