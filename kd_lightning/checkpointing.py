"""Student checkpoints without the frozen teacher (it is rebuilt from its config, not re-trained)."""

from __future__ import annotations

from typing import Any

from torch import nn


class TeacherOutOfCheckpoints:
    """Mixin for a LightningModule with a frozen ``teacher`` attribute and a ``save_teacher`` flag.

    Saving drops every ``teacher.*`` entry unless ``save_teacher``; loading such a checkpoint puts the
    in-memory teacher's weights back and checks that every other weight of the module is there. Call
    :meth:`configure_teacher_loading` in ``__init__``: teacher-less checkpoints then load non-strictly,
    because some strategies (FSDP) load weights before ``on_load_checkpoint`` can add the teacher's.
    """

    teacher: nn.Module | None
    save_teacher: bool

    def configure_teacher_loading(self) -> None:
        self.strict_loading = self.teacher is None or self.save_teacher

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.teacher is not None and not self.save_teacher:
            checkpoint["state_dict"] = {
                name: value for name, value in checkpoint["state_dict"].items() if not name.startswith("teacher.")
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if self.teacher is None or state is None:  # FSDP loads (and removes) the weights before this hook
            return
        missing = [name for name in self.state_dict() if not name.startswith("teacher.") and name not in state]
        if missing:
            raise RuntimeError(f"the checkpoint lacks the weights {missing[:5]}: it is not a checkpoint of this model")
        if not any(name.startswith("teacher.") for name in state):
            state.update({f"teacher.{name}": value for name, value in self.teacher.state_dict().items()})
