"""What a process loads: the package and the distributed worker's path import only what they use
(the workflow builder, the compiler's module, process isolation with multiprocessing, asyncio
and urllib.request come on first use), and the public API is unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


def run(code: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, HERE]))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


HEAVY = ["asyncio", "multiprocessing", "pickle", "urllib.request", "catzilla_tasks.workflows",
         "catzilla_tasks.compiler", "catzilla_tasks.isolation"]


def test_importing_the_package_loads_none_of_the_heavy_modules():
    got = run(f"""
        import json, sys
        import catzilla_tasks
        from catzilla_tasks import BackgroundTasks
        t = BackgroundTasks()
        print(t.add_task(sum, [1, 2]).wait(5), file=sys.stderr)
        print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))
    """)
    assert got == dict.fromkeys(HEAVY, False)


def test_the_worker_command_path_does_not_load_workflows_isolation_or_urllib():
    got = run("""
        import json, sys
        from catzilla_tasks import cli
        from catzilla_tasks.brokers import commands, worker
        cli.build_parser()
        print(json.dumps({m: m in sys.modules for m in ["multiprocessing", "urllib.request",
                                                        "catzilla_tasks.workflows", "catzilla_tasks.isolation"]}))
    """)
    assert got == dict.fromkeys(got, False) and len(got) == 4


def test_lazy_names_are_the_real_objects_and_listed():
    import catzilla_tasks
    from catzilla_tasks import compiler, workflows

    for name in ("TaskChain", "WorkflowError", "call", "chain", "chord", "group", "result_of", "results_of",
                 "workflow"):
        assert getattr(catzilla_tasks, name) is getattr(workflows, name)
        assert name in dir(catzilla_tasks) and name in catzilla_tasks.__all__
    assert catzilla_tasks.CompileError is compiler.CompileError
    try:
        catzilla_tasks.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_async_tasks_and_process_tasks_load_what_they_need_on_first_use():
    got = run("""
        import json, sys
        from catzilla_tasks import BackgroundTasks
        import isolation_helpers as h
        t = BackgroundTasks()
        before = [m in sys.modules for m in ("asyncio", "catzilla_tasks.isolation")]
        async def coro():
            return 7
        a = t.add_task(coro).wait(10)
        p = t.options(isolation="process").add_task(h.add, 2, 3).wait(60)
        t.shutdown()
        print(json.dumps({"before": before, "async": a, "process": p}))
    """)
    assert got == {"before": [False, False], "async": 7, "process": 5}


def test_process_tasks_queued_at_exit_still_run():
    # isolation (and its exit hook) is loaded after engine.py registered the engines' drain:
    # the drain must still run before the process pools stop
    got = run("""
        import json, os, sys, tempfile
        from catzilla_tasks import BackgroundTasks
        import isolation_helpers as h
        t = BackgroundTasks(workers=2)
        t.options(isolation="process").add_task(h.add, 1, 1).wait(60)   # the pool exists
        d = tempfile.mkdtemp()
        for i in range(6):
            t.options(isolation="process").add_task(h.touch, os.path.join(d, str(i)))
        print(json.dumps({"dir": d}))
    """)
    assert sorted(os.listdir(got["dir"])) == [str(i) for i in range(6)]


def test_default_engine_is_the_newest_even_when_workflows_load_after_the_engines():
    got = run("""
        import json
        from catzilla_tasks import BackgroundTasks
        engines = [BackgroundTasks(workers=1, min_workers=1, name=f"e{i}") for i in range(6)]
        from catzilla_tasks.workflows import default_engine   # loaded now, after all six
        first = default_engine().name
        engines[5].shutdown()
        second = default_engine().name
        print(json.dumps([first, second]))
    """)
    assert got == ["e5", "e4"]


def test_tasks_decorated_with_compile_to_c_false_do_not_load_the_compiler():
    got = run("""
        import json, sys
        from catzilla_tasks import BackgroundTasks, task
        t = BackgroundTasks()

        @t.task(compile_to_c=False)
        def a(x: int) -> int:
            return x + 1

        @task(compile_to_c=False)
        def b(x: int) -> int:
            return x * 2

        print(t.add_task(a, 1).wait(5), t.add_task(b, 2).wait(5), file=sys.stderr)
        before = "catzilla_tasks.compiler" in sys.modules

        @t.task
        def c(x: int) -> int:
            return x - 1

        print(json.dumps({"without": before, "with": "catzilla_tasks.compiler" in sys.modules}))
    """)
    assert got == {"without": False, "with": True}


def test_mapping_plain_functions_does_not_load_the_compiler():
    # tasks.map's plumbing is mapping.py; only a compiled task needs compiler/
    got = run("""
        import json, sys
        from catzilla_tasks import BackgroundTasks
        t = BackgroundTasks()
        assert t.map(abs, [-1, 2, -3]) == [1, 2, 3]
        assert list(t.map(pow, [2, 3], [3, 2], out="array")) == [8, 9]
        print(json.dumps({m: m in sys.modules for m in ["catzilla_tasks.compiler", "catzilla_tasks.mapping"]}))
    """)
    assert got == {"catzilla_tasks.compiler": False, "catzilla_tasks.mapping": True}


def test_the_compiler_and_isolation_packages_keep_the_names_others_import():
    # compiler/ and isolation/ are packages split by concern: what users, engine.py, mapping.py,
    # the C engine's hooks and the generated trampoline modules import stays at the package level
    got = run("""
        import json
        from catzilla_tasks import compiler, isolation
        names = ["TaskCompiler", "CompileError", "NativeTask", "can_compile_to_c", "explain", "precompile",
                 "wait_for_background", "default_compiler", "native_of", "attach", "_registered", "_Cannot",
                 "_Spec", "_numba_missing"]
        pool = ["ProcessPool", "IsolatedCall", "CancelToken", "check_picklable", "in_pool_child", "pickle_task",
                "_Deadline", "_death_error"]
        print(json.dumps({"compiler": [n for n in names if not hasattr(compiler, n)],
                          "isolation": [n for n in pool if not hasattr(isolation, n)],
                          "all": sorted(compiler.__all__)}))
    """)
    assert got["compiler"] == [] and got["isolation"] == []
    assert got["all"] == sorted(["TaskCompiler", "CompileError", "NativeTask", "can_compile_to_c", "explain",
                                 "precompile", "wait_for_background", "default_compiler"])
