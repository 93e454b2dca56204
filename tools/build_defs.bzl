# Thin project macros: shared flags for C++, CUDA and protobuf targets.

def qt_cc_library(name, **kwargs):
    native.cc_library(name = name, **kwargs)

def qt_cc_binary(name, **kwargs):
    native.cc_binary(name = name, **kwargs)

def qt_cc_test(name, deps = [], **kwargs):
    native.cc_test(
        name = name,
        deps = deps + ["//third_party:gtest_main"],
        **kwargs
    )

def qt_proto_library(name, src, grpc = False, deps = []):
    """Generates C++ from one .proto with the system protoc (and grpc_cpp_plugin)."""
    base = src[:-len(".proto")]
    outs = [base + ".pb.h", base + ".pb.cc"]
    cmd = "/usr/bin/protoc --proto_path=. --cpp_out=$(GENDIR)"
    if grpc:
        outs += [base + ".grpc.pb.h", base + ".grpc.pb.cc"]
        cmd += " --grpc_out=$(GENDIR) --plugin=protoc-gen-grpc=/usr/bin/grpc_cpp_plugin"
    native.genrule(
        name = name + "_gen",
        srcs = [src],
        outs = outs,
        cmd = cmd + " $(location " + src + ")",
    )
    native.cc_library(
        name = name,
        srcs = [o for o in outs if o.endswith(".cc")],
        hdrs = [o for o in outs if o.endswith(".h")],
        deps = deps + (["//third_party:grpc"] if grpc else ["//third_party:protobuf"]),
    )

# Hopper first (sm_90a), PTX of compute_80 so older chips JIT-compile.
NVCC_FLAGS = (
    "-O3 -std=c++17 --expt-relaxed-constexpr -lineinfo " +
    "-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=compute_80 " +
    "-Xcompiler -fPIC -I. -I$(GENDIR)"
)

def qt_cuda_library(name, srcs, hdrs = [], deps = [], cuda_hdrs = [], tags = []):
    """Compiles .cu files with nvcc into objects and wraps them in a cc_library.

    cuda_hdrs: headers the .cu files include (their own and those of deps).
    """
    objs = []
    for src in srcs:
        obj = src[:-len(".cu")] + ".cu.o"
        native.genrule(
            name = name + "_" + src.replace("/", "_").replace(".", "_"),
            srcs = [src] + hdrs + cuda_hdrs,
            outs = [obj],
            cmd = "/usr/local/cuda/bin/nvcc " + NVCC_FLAGS + " -c $(location " + src + ") -o $@",
            tags = tags,
        )
        objs.append(obj)
    native.cc_library(
        name = name,
        srcs = objs,
        hdrs = hdrs,
        deps = deps + ["//third_party:cuda_runtime"],
        tags = tags,
        linkstatic = 1,
    )
