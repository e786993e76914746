"""The report: `ntt report PATH` writes one self-contained HTML page of a run, a study or an `ntt segment`
folder.

main.py           the command; what PATH is (kind_of); write_report
runreport.py      one run: metrics, per-class AP, the images most wrong (drawn), failures, config, identity
imagescore.py     how wrong an image is: missed ground truth, false positives, its own AP50 (pycocotools)
studyreport.py    a study: box and mask AP over seeds (mean +- std, 95% CI), AP against shots, the runs
segmentreport.py  an `ntt segment` folder: detections per image and class, overlays, failures
page.py           the HTML (inline CSS, sortable tables); pictures.py: data URIs; plots.py: inline SVG
"""

from ntt.report.main import kind_of, write_report
from ntt.report.runreport import ReportOptions

__all__ = ["ReportOptions", "kind_of", "write_report"]
