import json, sys
# Markdown tables of docs/results.md from alpha_sweep.sh's results.jsonl.
rows = {}
for line in open(sys.argv[1] if len(sys.argv) > 1 else 'target/alpha-sweep/results.jsonl'):
    d = json.loads(line)
    rows[d['tag']] = d['results'][0]['perplexity']
fp32 = rows.get('fp32')
names = {'ct': 'weights channel, acts token', 'o1': 'O1 (weights tensor, acts token)', 'o2': 'O2 (weights tensor, acts tensor)', 'o3': 'O3 (weights tensor, acts static)'}
alphas = ['0.3', '0.4', '0.5', '0.6', '0.7', '0.8', '0.9']
def f(v): return '–' if v is None else f'{v:.3f}'
# The defaults (no --smooth-targets): one fixed alpha smooths the paper's targets with per-token
# activations (ct, O1) and all with per-tensor ones (O2, O3); auto searches all.
default_targets = {'ct': 'paper', 'o1': 'paper', 'o2': 'all', 'o3': 'all'}
for targets in ['default', 'paper', 'all']:
    print(f'\n### `--smooth-targets {targets}`\n' if targets != 'default' else '\n### Defaults (no `--smooth-targets`: `paper` for a fixed α with per-token activations, `all` for per-tensor ones and for auto)\n')
    # `all` also has α 0.5 with --smooth-fold runtime (not part of the global sweep).
    extra = targets == 'all'
    fixed = (lambda r: default_targets[r]) if targets == 'default' else (lambda r: targets)
    searched = (lambda r: 'all') if targets == 'default' else (lambda r: targets)
    print('| recipe | fp32 | naive | ' + ' | '.join('α ' + a for a in alphas) + (' | α 0.5, run-time divides' if extra else '') + ' | auto | best global α | auto vs best | auto vs 0.5 | auto vs fp32 |')
    print('|---|' + '---:|' * (len(alphas) + 7 + extra))
    for r in ['ct', 'o1', 'o2', 'o3']:
        sweep = {a: rows.get(f'{fixed(r)}-{r}-{a}') for a in alphas}
        auto = rows.get(f'{searched(r)}-{r}-auto')
        have = {a: v for a, v in sweep.items() if v is not None}
        best = min(have.items(), key=lambda kv: kv[1]) if have else None
        cells = [names[r] + (f' ({fixed(r)})' if targets == 'default' else ''), f(fp32), f(rows.get(f'naive-{r}'))] + [('**' + f(v) + '**') if best and a == best[0] else f(v) for a, v in sweep.items()] + ([f(rows.get(f'{targets}-{r}-0.5-runtime'))] if extra else []) + [f(auto)]
        cells.append(f'{best[0]} ({best[1]:.3f})' if best else '–')
        cells.append(f'{100*(auto/best[1]-1):+.2f}%' if auto and best else '–')
        cells.append(f'{100*(auto/sweep["0.5"]-1):+.2f}%' if auto and sweep['0.5'] else '–')
        cells.append(f'{100*(auto/fp32-1):+.2f}%' if auto and fp32 else '–')
        print('| ' + ' | '.join(cells) + ' |')
