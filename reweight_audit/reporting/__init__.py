"""Stage 4, report: what a compare or a sweep returned, as files a reader opens.

``exports`` writes a compare folder (CSV, Markdown, JSON, parquet, PNG, heatmap.html, report.html) in one atomic
swap; ``render`` draws the tables and plots; ``pages`` renders the report.html pages (Jinja2 templates in
``templates/``, autoescaped); ``sweep_report`` writes a sweep folder; ``train_report`` the page of a train folder.

May import: ``reweight_audit.core``, ``reweight_audit.methods`` and ``reweight_audit.evaluation``'s results and
metric declarations — never scoring or injection, and nothing imports it but training and the faces.
"""
