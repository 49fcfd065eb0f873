"""Studies that need new extraction (captioners, CLIP architectures): the `dvc exp run`
commands that run them, since extraction is DVC's job; each experiment's metrics/eval.json is
then compared with `dvc exp show`."""

from __future__ import annotations

from typing import Any, ClassVar

from pipeline.studies.base import Study, StudyInputs


class Recipe(Study):
    """A study made of DVC experiments: `run` lists their commands (nothing is trained here)."""

    #: (label, the `-S` overrides of one experiment)
    experiments: ClassVar[tuple[tuple[str, str], ...]] = ()

    def commands(self) -> list[str]:
        return [
            f"dvc exp run --name {self.name}-{label} {overrides}"
            for label, overrides in self.experiments
        ] + ["dvc exp show --only-changed --md   # compare the experiments' metrics"]

    def run(self, inputs: StudyInputs) -> dict[str, Any]:
        return {
            "study": self.name,
            "summary": self.summary,
            "reproduces": self.reproduces,
            "recipe": True,
            "commands": self.commands(),
        }


class Captioners(Recipe):
    name = "captioners"
    summary = "one experiment per caption model; DVC reruns captions and what follows them"
    reproduces = "ITEM Fig. 7"
    experiments = (
        ("blip2", "-S caption.model=blip2"),
        ("blip", "-S caption.model=blip"),
        ("llava", "-S caption.model=llava"),
    )


class ClipArch(Recipe):
    name = "clip_arch"
    summary = "one experiment per CLIP architecture; DVC re-encodes and retrains"
    reproduces = "ITEM Fig. 8"
    experiments = (
        ("rn50", "-S models.clip.id=RN50 -S models.clip.pretrained=openai"),
        ("vitb16", "-S models.clip.id=ViT-B-16 -S models.clip.pretrained=openai"),
        ("vitl14", "-S models.clip.id=ViT-L-14 -S models.clip.pretrained=openai"),
    )
