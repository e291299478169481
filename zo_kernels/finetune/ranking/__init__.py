"""The ranking harness (issue 25): every method tuned over a learning-rate grid on the validation split,
then three seeds at its best rate, merged into ranking.json and a Markdown table.

plan (the runs and their arguments), choice (the rate, by validation accuracy), runner (run, skip, resume,
lanes), collect (ranking.json), table (the Markdown fragment), cli (`python scripts/rank.py`).
"""
