/* Loaded into DCMTK's storescp with LD_PRELOAD by the bench (bench.servers.DurableStorescp):
 * every regular file storescp has open for writing is fsynced, and then its directory, as it
 * is closed. storescp closes a received file before it sends the C-STORE response, so it
 * answers only once the instance and its directory entry are on the disk: the promise
 * dicom-ingest's spool keeps before it answers 0x0000, at the cost DCMTK pays for it.
 *
 * storescp writes through stdio (fclose) and may close descriptors itself (close): both are
 * wrapped. Errors are ignored: this is a measuring aid, not a storage layer. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int (*next_close)(int);
static int (*next_fclose)(FILE *);

static int real_close(int fd) {
    if (!next_close)
        next_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
    return next_close(fd);
}

static void fsync_file_and_directory(int fd) {
    struct stat st;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || (flags & O_ACCMODE) == O_RDONLY || fstat(fd, &st) != 0 ||
        !S_ISREG(st.st_mode))
        return;
    fsync(fd);
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0)
        return;
    path[n] = '\0';
    char *slash = strrchr(path, '/');
    if (!slash)
        return;
    if (slash == path)
        slash[1] = '\0';
    else
        *slash = '\0';
    int dir = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir >= 0) {
        fsync(dir);
        real_close(dir);
    }
}

int close(int fd) {
    fsync_file_and_directory(fd);
    return real_close(fd);
}

int fclose(FILE *stream) {
    if (!next_fclose)
        next_fclose = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    if (stream) {
        fflush(stream);
        fsync_file_and_directory(fileno(stream));
    }
    return next_fclose(stream);
}
