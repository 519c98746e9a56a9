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
# The best global alpha of a sweep: (alpha, perplexity), or None.
def best_of(t, r):
    have = {a: rows.get(f'{t}-{r}-{a}') for a in alphas}
    have = {a: v for a, v in have.items() if v is not None}
    return min(have.items(), key=lambda kv: kv[1]) if have else None
for targets in ['paper', 'all']:
    print(f'\n### `--smooth-targets {targets}`\n')
    # `all` also has α 0.5 with --smooth-fold runtime (not part of the global sweep).
    extra = targets == 'all'
    print('| recipe | fp32 | naive | ' + ' | '.join('α ' + a for a in alphas) + (' | α 0.5, run-time divides' if extra else '') + ' | auto | best global α | auto vs best | auto vs 0.5 | auto vs fp32 |')
    print('|---|' + '---:|' * (len(alphas) + 7 + extra))
    for r in ['ct', 'o1', 'o2', 'o3']:
        sweep = {a: rows.get(f'{targets}-{r}-{a}') for a in alphas}
        auto = rows.get(f'{targets}-{r}-auto')
        best = best_of(targets, r)
        cells = [names[r], f(fp32), f(rows.get(f'naive-{r}'))] + [('**' + f(v) + '**') if best and a == best[0] else f(v) for a, v in sweep.items()] + ([f(rows.get(f'{targets}-{r}-0.5-runtime'))] if extra else []) + [f(auto)]
        cells.append(f'{best[0]} ({best[1]:.3f})' if best else '–')
        cells.append(f'{100*(auto/best[1]-1):+.2f}%' if auto and best else '–')
        cells.append(f'{100*(auto/sweep["0.5"]-1):+.2f}%' if auto and sweep['0.5'] else '–')
        cells.append(f'{100*(auto/fp32-1):+.2f}%' if auto and fp32 else '–')
        print('| ' + ' | '.join(cells) + ' |')

# The acceptance table of issue 6: SmoothQuant at alpha 0.5 as the paper defines it (its targets) and
# with the default targets (all), auto with the default targets, and the best global alpha of each sweep.
def pct(a, b): return f'{100*(a/b-1):+.2f}%' if a and b else '–'
print('\n### Issue 6 acceptance: α 0.5 with the paper\'s targets and with `all` (the default), auto (default targets)\n')
print('| recipe | fp32 | naive | α 0.5, paper | α 0.5, all | auto | best global α, paper | best global α, all | auto vs 0.5 paper / all | auto vs best paper / all | auto vs fp32 |')
print('|---|' + '---:|' * 10)
for r in ['ct', 'o1', 'o2', 'o3']:
    p05, a05, auto = rows.get(f'paper-{r}-0.5'), rows.get(f'all-{r}-0.5'), rows.get(f'all-{r}-auto')
    bp, ba = best_of('paper', r), best_of('all', r)
    print('| ' + ' | '.join([names[r], f(fp32), f(rows.get(f'naive-{r}')), f(p05), f(a05), f(auto),
        f'{bp[0]} ({bp[1]:.3f})' if bp else '–', f'{ba[0]} ({ba[1]:.3f})' if ba else '–',
        pct(auto, p05) + ' / ' + pct(auto, a05), pct(auto, bp and bp[1]) + ' / ' + pct(auto, ba and ba[1]), pct(auto, fp32)]) + ' |')
