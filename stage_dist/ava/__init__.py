"""AVA's formats (CSV, label maps, results.csv), the official frame-mAP@0.5 reproduced, its
statistics and the results.csv check.
"""
