"""The one rule that turns the model's numbers into an answer: a label, "not sure" or "neither", for every output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

__all__ = ["NEITHER", "NOT_SURE", "UNSURE_BELOW", "Verdict", "decide"]

NOT_SURE = "not sure"
NEITHER = "neither"
# Below this probability for the label it leans to, the model is said to be not sure. Calibrated
# probabilities (temperature scaling at training time) make 0.70 mean "right about 7 times in 10".
UNSURE_BELOW = 0.70


@dataclass(frozen=True)
class Verdict:
    """What to tell a person about one picture."""

    answer: str  # one of the model's labels, NOT_SURE or NEITHER
    leaning: str  # the label with the higher probability, whatever the answer
    confidence: float  # that label's probability

    @property
    def is_confident(self) -> bool:
        return self.answer not in (NOT_SURE, NEITHER)

    @property
    def percent(self) -> str:
        """The confidence as a percentage, with the digits it takes to fall on its own side of the 70% line:
        0.697 is "69.7%" (not sure) and 0.703 "70.3%" (sure), never both "70%"."""
        digits = 0
        while digits < 3 and self.confidence != UNSURE_BELOW and round(self.confidence * 100, digits) == UNSURE_BELOW * 100:
            digits += 1
        return f"{self.confidence * 100:.{digits}f}%"

    def sentence(self) -> str:
        """One plain sentence, for a page or a table's note column."""
        if self.answer == NEITHER:
            return (f"This doesn't look like a cat or a dog: it is unlike every training photo "
                    f"(the model would have said {self.leaning}, {self.percent}).")
        if self.answer == NOT_SURE:
            return f"Not sure: the model leans to {self.leaning}, with only {self.percent}."
        return f"{self.answer.capitalize()}, {self.percent} sure."


def decide(probabilities: Mapping[str, float], looks_like_training_photos: bool = True) -> Verdict:
    """The verdict for one picture's ``{label: probability}`` and the "neither" detector's answer."""
    leaning = max(probabilities, key=probabilities.get)
    confidence = float(probabilities[leaning])
    if not looks_like_training_photos:
        return Verdict(NEITHER, leaning, confidence)
    return Verdict(leaning if confidence >= UNSURE_BELOW else NOT_SURE, leaning, confidence)
