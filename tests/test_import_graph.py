"""The package's modules import one way: no module reaches itself through its imports.

The graph is built by grimp from the source (imports inside functions included), so a cycle hidden
behind a lazy import counts as one.
"""

from __future__ import annotations

import grimp


def test_no_module_of_the_package_imports_itself_through_others() -> None:
    graph = grimp.build_graph("sam3_batch")
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                cycles.append(" -> ".join((importer, *back)))

    assert len(graph.modules) > 40  # the whole package was read, worker/ and producer/ included
    assert cycles == []
