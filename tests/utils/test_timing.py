from lightning_quant.utils.timing import SPEED_FLAGS, cpu_kind, has_int8_dot_product, machine_description, median_ms


def test_machine_description_names_the_cpu_and_the_flags_that_decide_int8_speed(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
        "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16\n\nprocessor\t: 1\n"
    )
    line = machine_description(str(cpuinfo))
    assert line.startswith("Intel(R) Xeon(R) Platinum 8488C (avx2, avx512f, avx512_vnni, amx_tile, amx_int8, amx_bf16)")
    assert "threads, torch " in line


def test_machine_description_says_when_no_speed_flag_is_present(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Old CPU\nflags\t\t: fpu sse2\n")
    assert machine_description(str(cpuinfo)).startswith(f"Old CPU (none of {'/'.join(SPEED_FLAGS)})")


def test_median_ms_is_the_median_of_the_timed_calls():
    calls = []
    assert median_ms(lambda: calls.append(1), repeats=5, warmup=2) >= 0
    assert len(calls) == 7


def test_int8_dot_products_are_read_off_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2\n")
    assert has_int8_dot_product(str(cpuinfo)) is False
    cpuinfo.write_text("model name\t: Xeon\nflags\t\t: avx2 avx512f avx512_vnni\n")
    assert has_int8_dot_product(str(cpuinfo)) is True
    assert has_int8_dot_product(str(tmp_path / "missing")) is None


def test_the_kind_of_cpu_is_its_strongest_int8_instruction_set(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    for flags, kind in (
        ("avx2 avx512f avx512_vnni amx_tile amx_int8", "amx"),
        ("avx2 avx_vnni avx512f avx512_vnni avx512_bf16", "avx512_vnni"),
        ("avx2 avx_vnni", "avx_vnni"),
        ("avx avx2", "avx2"),
        ("sse2", "other"),
    ):
        cpuinfo.write_text(f"model name\t: A CPU\nflags\t\t: fpu {flags}\n")
        assert cpu_kind(str(cpuinfo)) == kind
    assert cpu_kind(str(tmp_path / "missing")) == "other"
