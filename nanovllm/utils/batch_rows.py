"""How this step's batch relates to the last one's, so that per-row state can carry over."""


def kept_rows(previous: list[int], current: list[int]) -> list[int] | None:
    """previous, current: the sequence ids of two batches, in row order. When current is previous with
    some rows removed (the usual change between decode steps: sequences finish, order is kept),
    returns for each row of current its row in previous; otherwise None. O(len(previous))."""
    rows, row = [], 0
    for seq_id in current:
        while row < len(previous) and previous[row] != seq_id:
            row += 1
        if row == len(previous):
            return None
        rows.append(row)
        row += 1
    return rows
