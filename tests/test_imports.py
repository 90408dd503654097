"""The project's files import one way, base to top (README: Reading the code):
    cli, edm_nets <- dataset_min, safe_files <- backbones <- gdd <- bench_min, sample_min, training_state <- fid_min <- toy
    <- train_min
Checked on the source with ast, so nothing is imported or run."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVEL = {'cli': 0, 'edm_nets': 0, 'dataset_min': 1, 'safe_files': 1, 'backbones': 2, 'gdd': 3, 'bench_min': 4, 'sample_min': 4,
         'training_state': 4, 'fid_min': 5, 'toy': 6, 'train_min': 7}


def project_imports(tree):
    """(module name, node, at top level?) for every import of a project file."""
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split('.')[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split('.')[0]]
        else:
            continue
        for name in names:
            if name in LEVEL:
                yield name, node, id(node) in top


def test_every_top_level_file_is_in_the_chain():
    files = {f[:-3] for f in os.listdir(ROOT) if f.endswith('.py')}
    assert files == set(LEVEL), 'a new top-level file must get a place in the import chain'


def test_imports_point_down_the_chain_and_sit_at_the_top():
    bad = []
    for module, level in LEVEL.items():
        path = os.path.join(ROOT, module + '.py')
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read(), path)
        for name, node, at_top in project_imports(tree):
            if LEVEL[name] >= level:
                bad.append(f'{module}.py:{node.lineno} imports {name} (not to its left)')
            if not at_top:
                bad.append(f'{module}.py:{node.lineno} imports {name} inside a function or block')
    assert not bad, '\n'.join(bad)


def _imported_roots(module):
    with open(os.path.join(ROOT, module + '.py'), encoding='utf-8') as f:
        tree = ast.parse(f.read())
    roots = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return roots | {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_dataset_min_needs_only_stdlib_numpy_pillow():
    # dataset_min converts datasets on machines without torch: it may use cli.py, whose only torch imports sit
    # inside the torchrun helpers that dataset_min does not call.
    assert not _imported_roots('dataset_min') & {'torch', 'scipy', *(set(LEVEL) - {'cli'})}
    assert not _imported_roots('cli') & ({'scipy'} | set(LEVEL))
    with open(os.path.join(ROOT, 'cli.py'), encoding='utf-8') as f:
        tree = ast.parse(f.read())
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) and 'torch' in ast.dump(n)]


def test_the_reading_path_reads_no_files():
    # edm_nets, gdd and train_min hold the networks, the method and the loop; file reading lives in safe_files.
    for module in ('edm_nets', 'gdd'):
        assert not _imported_roots(module) & {'pickle', 'zipfile', 'safe_files', 'urllib', 'io'}, module
