"""Off-policy token-level distillation, the default LM scheme (``llm/method=token_kd``)."""

from __future__ import annotations

from kd_lightning.methods.lm.base import LMMethod


class TokenKD(LMMethod):
    r"""Word-level KD (Kim & Rush 2016; the LM form of Hinton et al. 2015) on the dataset's sequences.

    .. math::
        L = \frac{1}{N} \sum_{i \in \mathrm{valid}} (1 - \alpha)\,\mathrm{CE}(z_s^i, y_i)
            + \alpha\, T^2 D\big(p_t^i \,\|\, p_s^i\big)

    over the reference or teacher-written completions of ``llm.data``, with any token loss of
    ``conf/llm/loss`` (forward KL, reverse KL, JSD, skew KLs, TVD; ULD / GOLD across tokenizers). The
    teacher runs live, or its top-k log-probabilities come from ``llm/teacher_cache=top_k`` (the sparse
    top-k loss over ``k + 1`` buckets).
    """

    scheme = "token_kd"
