"""Head-to-head user study (paper Sec. 4.1): build the site, collect answers, analyse them.

The criteria and their wording live here so the pages, the server's validation and the analysis
agree on one list.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Criterion:
    """One forced-choice question asked for every comparison."""

    key: str  # short name stored in the database and the CSV (Table 2 column header)
    label: str  # the question's title as shown to raters
    description: str  # what the rater is asked to judge


# Order and wording: the authors' survey page (victor-rong/video-generation-study, public/index.html),
# which the paper links as its user-study protocol; keys follow Table 2's column headers.
CRITERIA: tuple[Criterion, ...] = (
    Criterion(
        "AQ", "Appearance Quality",
        "Evaluate the clarity and visual appeal of the scene as it appears from any particular viewpoint "
        "(ignoring, e.g., inconsistencies in appearance across different viewpoints). Your assessment should "
        "focus on the appearance of the foreground object and ignore the background of the video.",
    ),
    Criterion(
        "SQ", "3D Structure Quality",
        "Assess the detail and realism of the shape of the scene across the multiple viewpoints shown in the "
        "video.",
    ),
    Criterion(
        "MQ", "Motion Quality",
        "Assess the realism of motion, including the amount of motion and how naturally the movements in the "
        "video are portrayed.",
    ),
    Criterion(
        "TA", "Text Alignment",
        "Determine how accurately each video reflects the content of the text prompt. Consider whether the "
        "key elements of the prompt are represented.",
    ),
    Criterion(
        "Overall", "Overall Preference",
        "State your overall preference between the two videos. This is your subjective appraisal of which "
        "video, in your view, stands out as better based on appearance quality, 3D structure quality, motion "
        "quality, and text alignment, (i.e., overall quality).",
    ),
)
CRITERION_KEYS: tuple[str, ...] = tuple(c.key for c in CRITERIA)
# Forced choice between the two videos on screen (the authors' app stores '0'/'1' for left/right).
CHOICES: tuple[str, ...] = ("left", "right")
# Column order of the exported answers CSV (documented in userstudy/README.md).
CSV_COLUMNS: tuple[str, ...] = (
    "rater_id", "comparison_id", "prompt", "left_method", "right_method", "criterion", "choice",
)

# Spreadsheets run a cell that starts with one of these as a formula (OWASP "CSV injection"), so the
# export prefixes such cells with an apostrophe. A cell that already starts with an apostrophe gets one
# too, so `csv_unquote` undoes `csv_quote` exactly (prompts and method names come back unchanged).
CSV_FORMULA_STARTS: tuple[str, ...] = ("=", "+", "-", "@", "\t", "\r")
_CSV_QUOTED_STARTS: tuple[str, ...] = (*CSV_FORMULA_STARTS, "'")


def csv_quote(cell: str) -> str:
    """A cell that no spreadsheet reads as a formula: `=1+1` -> `'=1+1`."""
    return "'" + cell if cell.startswith(_CSV_QUOTED_STARTS) else cell


def csv_unquote(cell: str) -> str:
    """Inverse of `csv_quote`: `'=1+1` -> `=1+1`; any other cell is returned as is."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(_CSV_QUOTED_STARTS) else cell
