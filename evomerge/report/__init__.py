"""Run reports: PNG plots and a Markdown summary from run directories (``evomerge report``).

``runs`` reads run directories, ``series`` computes the numbers, ``plots``
draws them, ``summary`` writes the Markdown and ``build`` puts a report
together. Only ``build`` and ``plots`` import matplotlib.
"""
