"""matplotlib for the plots every stage writes: the Agg backend (no display on servers), imported only when a plot
is drawn."""


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
