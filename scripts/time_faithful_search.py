"""Time the faithful AWT search on smallcnn (random 28x28 data): CPU seconds per iteration, page faults, peak RSS.

Usage: python scripts/time_faithful_search.py ITERS  (T=threads, default 1). Run it twice (e.g. 3 and 8 iterations):
the difference divided by 5 is the steady per-iteration cost without start-up."""
import os, sys, time, resource, torch
from robustsparse.config import load_config
from robustsparse.models import build_model
from robustsparse.prune.search import ntk_search
torch.set_num_threads(int(os.environ.get("T", "1")))
iters = int(sys.argv[1]) if len(sys.argv) > 1 else 3
cfg = load_config("fmnist_pgdat", ["prune.method=awt", "prune.density=0.1", "prune.preset=faithful",
                                   f"prune.search_iters={iters}", "prune.init_method=magnitude"])
torch.manual_seed(0)
model = build_model(cfg.model.name, in_channels=1, num_classes=10, input_size=(28, 28))
x = torch.rand(512, 1, 28, 28); y = torch.randint(10, (512,))
r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
ticket = ntk_search(model, cfg, x, y, points="adversarial", progress=False)
r1 = resource.getrusage(resource.RUSAGE_SELF); t1 = time.perf_counter()
print(f"iters {iters} wall {(t1-t0)/iters:.2f}s/it user {(r1.ru_utime-r0.ru_utime)/iters:.2f} sys {(r1.ru_stime-r0.ru_stime)/iters:.2f} "
      f"maxrss {r1.ru_maxrss/1e6:.2f} GB minflt {(r1.ru_minflt-r0.ru_minflt)/iters:.0f}/it")
print(ticket.info["log"][-1])
